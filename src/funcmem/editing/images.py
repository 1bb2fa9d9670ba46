"""Decoding image files, safely: a short list of formats, size limits before decoding, one error type.

    read_rgb(path)            -> (3, H, W) float32 in [0, 1]     (or ImageError naming the file and why)
    decode_rgb(data, name)    -> the same, from bytes
    decode_rgb8(data, name)   -> (H, W, 3) uint8 numpy array     (4x smaller: what the service keeps)
    probe(data, name)         -> (format, width, height) from the header alone, nothing decoded

Only PNG, JPEG and WebP are decoded (``FORMATS``; pass ``formats=`` to allow others PIL reads).
The format is recognised from the file's first bytes (its magic number) and PIL is told to use
that one decoder, so a file never reaches a parser it did not claim (EPS would reach Ghostscript,
DDS and SPIDER have crashed PIL with exceptions outside its documented ones).

Every mode PIL reads is brought to 8-bit RGB the same way:

- EXIF orientation is applied first (a broken EXIF block is ignored with a warning);
- transparency (RGBA, LA, PA, or a palette / RGB / L image with a transparent colour) is
  composited on **white**: transparent pixels become white, not the arbitrary colour they hide;
- palette (P), grayscale (L, 1), CMYK and YCbCr go through PIL's own conversion;
- 16-bit grayscale (I;16*) and 32-bit integer (I) are scaled from [0, 65535] (from [0, 255] when
  no value exceeds 255); float (F) from [0, 1] (from [0, 255] when a value exceeds 1); then clipped;
- an image with more than ``max_pixels`` pixels (a decompression bomb, or just too big to edit) or
  a side ratio above ``max_aspect`` is refused *before* its pixels are decoded;
- truncated or corrupt data, a file that is not an image, an empty file: refused.

Nothing from deep inside PIL reaches the user as the message: every failure, whatever PIL raised,
is an ``ImageError`` (a ``ValueError``) that names the file and gives one reason; the original
exception is chained.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

MAX_PIXELS = 40_000_000  # 40 MP: a 8000 x 5000 photo; 120 MB as uint8 RGB (the service allows less)
MAX_ASPECT = 100.0  # longest side / shortest side
FORMATS = ("PNG", "JPEG", "WEBP")  # decoded by default
MAGIC = {  # PIL format -> how its files start (offset, bytes)
    "PNG": [(0, b"\x89PNG\r\n\x1a\n")],
    "JPEG": [(0, b"\xff\xd8\xff")],
    "WEBP": [(0, b"RIFF"), (8, b"WEBP")],
    "GIF": [(0, b"GIF8")],
    "BMP": [(0, b"BM")],
    "TIFF": [(0, b"II*\x00")],
}
MAGIC_ALT = {"TIFF": [(0, b"MM\x00*")]}


class ImageError(ValueError):
    """An image file that cannot be used; the message names the file and the reason."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"cannot read image {name}: {reason}")
        self.name, self.reason = name, reason


def sniff(data: bytes) -> str | None:
    """The format a file's first bytes announce (a key of ``MAGIC``), or None."""
    for fmt in MAGIC:
        for rule in (MAGIC[fmt], MAGIC_ALT.get(fmt)):
            if rule and all(data[o:o + len(m)] == m for o, m in rule):
                return fmt
    return None


def read_rgb(path: str | Path, max_pixels: int = MAX_PIXELS, max_aspect: float = MAX_ASPECT,
             formats: tuple[str, ...] = FORMATS) -> Tensor:
    """An image file as (3, H, W) float32 in [0, 1] (see the module doc for the conversions).

    Raises:
        FileNotFoundError: no file at ``path``.
        ImageError: the file cannot be decoded, or its size or format is refused.
    """
    return _float(decode_rgb8(read_bytes(path), str(path), max_pixels, max_aspect, formats))


def read_rgb8(path: str | Path, max_pixels: int = MAX_PIXELS, max_aspect: float = MAX_ASPECT,
              formats: tuple[str, ...] = FORMATS) -> np.ndarray:
    """``read_rgb`` as (H, W, 3) uint8."""
    return decode_rgb8(read_bytes(path), str(path), max_pixels, max_aspect, formats)


def read_bytes(path: str | Path) -> bytes:
    """A file's bytes; FileNotFoundError when there is none, ``ImageError`` when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no image file at {path}")
    try:
        return path.read_bytes()
    except OSError as e:
        raise ImageError(str(path), f"cannot open the file ({e.strerror or e})") from e


def decode_rgb(data: bytes, name: str = "<bytes>", max_pixels: int = MAX_PIXELS,
               max_aspect: float = MAX_ASPECT, formats: tuple[str, ...] = FORMATS) -> Tensor:
    """Encoded image bytes as (3, H, W) float32 in [0, 1]; ``name`` is used in error messages."""
    return _float(decode_rgb8(data, name, max_pixels, max_aspect, formats))


def _float(array: np.ndarray) -> Tensor:
    return torch.from_numpy(array).permute(2, 0, 1).float() / 255  # (3, H, W)


def probe(data: bytes, name: str = "<bytes>", formats: tuple[str, ...] = FORMATS) -> tuple[str, int, int]:
    """(format, width, height) read from the header, no pixel decoded (sides as stored, before
    any EXIF rotation). Raises ``ImageError`` for an empty, unrecognised or refused file."""
    with _opened(data, name, formats) as im:
        return im.format, *im.size


def decode_rgb8(data: bytes, name: str = "<bytes>", max_pixels: int = MAX_PIXELS,
                max_aspect: float = MAX_ASPECT, formats: tuple[str, ...] = FORMATS) -> np.ndarray:
    """Encoded image bytes as (H, W, 3) uint8 (see the module doc); ``ImageError`` otherwise."""
    with _opened(data, name, formats) as im:
        _check_size(im.size, name, max_pixels, max_aspect)
        return _guarded(name, lambda: _decode(im, name))


def _decode(im: Image.Image, name: str) -> np.ndarray:
    im.load()  # decode now, inside the guard: truncated data fails here
    return _to_rgb_array(_upright(im, name))


class _opened:
    """``with _opened(data, name, formats) as im``: the file opened by the one decoder its magic
    number names (when that format is allowed); every failure an ``ImageError``."""

    def __init__(self, data: bytes, name: str, formats: tuple[str, ...]):
        self.data, self.name, self.formats = data, name, formats
        self.im = None

    def __enter__(self) -> Image.Image:
        if not self.data:
            raise ImageError(self.name, "the file is empty")
        fmt = sniff(self.data)
        if fmt not in self.formats:
            accepted = ", ".join(self.formats)
            raise ImageError(self.name, f"a {fmt} image, which is not accepted (accepted: {accepted})" if fmt else
                             f"not an image in an accepted format ({accepted}): its first bytes match none of them")
        self.im = _guarded(self.name, lambda: Image.open(io.BytesIO(self.data), formats=[fmt]))
        return self.im

    def __exit__(self, *exc) -> None:
        if self.im is not None:
            self.im.close()


def _guarded(name: str, step):
    """Run a PIL step; whatever it raises becomes an ``ImageError`` that names the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return step()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(name, f"refused as a possible decompression bomb ({e})") from e
    except MemoryError as e:
        raise ImageError(name, "not enough memory to decode it") from e
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, EOFError, but also NotImplementedError,
        reason = str(e) or type(e).__name__  # AttributeError, IndexError, struct.error ... on crafted files
        if "truncated" in reason or isinstance(e, EOFError):
            reason = f"the file is truncated or corrupt ({reason})"
        elif "cannot identify image file" in reason:
            reason = "the data is not a readable image (wrong extension, or corrupt)"
        else:
            reason = f"the data is corrupt or unsupported ({type(e).__name__}: {reason})"
        raise ImageError(name, reason) from e


def _check_size(size: tuple[int, int], name: str, max_pixels: int, max_aspect: float) -> None:
    w, h = size
    if w < 1 or h < 1:
        raise ImageError(name, f"it has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise ImageError(name, f"{w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,} "
                               "(a decompression bomb, or too large; pass max_pixels= to allow it)")
    if max(w, h) / min(w, h) > max_aspect:
        raise ImageError(name, f"{w}x{h} has a side ratio above {max_aspect:g}")


def _upright(im: Image.Image, name: str) -> Image.Image:
    """Apply the EXIF orientation; a broken EXIF block is ignored (with a warning)."""
    try:
        ImageOps.exif_transpose(im, in_place=True)  # not a copy when there is nothing to turn
        return im
    except Exception as e:  # PIL raises many types on malformed EXIF
        warnings.warn(f"{name}: ignoring its unreadable EXIF orientation ({type(e).__name__}: {e})", stacklevel=4)
        return im


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    """Any PIL mode -> (H, W, 3) uint8, transparency composited on white."""
    if im.mode.startswith("I") or im.mode == "F":
        gray = np.asarray(im, dtype=np.float64)  # (H, W)
        if im.mode == "F":
            top = 255.0 if np.nanmax(gray, initial=0) > 1 else 1.0
        else:
            top = 65535.0 if (im.mode.startswith("I;16") or np.max(gray, initial=0) > 255) else 255.0
        gray = np.nan_to_num(np.clip(gray / top, 0, 1)) * 255
        return np.repeat(gray.round().astype(np.uint8)[..., None], 3, axis=2)
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    return _rgb_copy(im if im.mode == "RGB" else im.convert("RGB"))


def _rgb_copy(im: Image.Image) -> np.ndarray:
    """An RGB image's pixels as a new (H, W, 3) uint8 array, copied a strip of rows at a time (a
    whole-image ``np.asarray`` makes two more full copies on the way: bytes, then writable)."""
    w, h = im.size
    out = np.empty((h, w, 3), np.uint8)
    step = max(1, 2**22 // (3 * w))
    for y in range(0, h, step):
        strip = np.asarray(im.crop((0, y, w, min(h, y + step))))
        if strip.shape != (min(h, y + step) - y, w, 3):
            raise ValueError(f"mode {im.mode} gave an array of shape {strip.shape}")
        out[y:y + step] = strip
    return out
