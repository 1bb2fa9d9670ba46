"""Decoding image files, safely: one function, one error type.

    read_rgb(path)        -> (3, H, W) float32 in [0, 1]       (or ImageError naming the file and why)
    decode_rgb(data, name) -> the same, from bytes

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

Nothing from deep inside PIL reaches the user as the message: every failure is an ``ImageError``
(a ``ValueError``) that names the file and gives one reason; the original exception is chained.
"""

from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

MAX_PIXELS = 40_000_000  # 40 MP: a 8000 x 5000 photo; as float32 RGB that is already 480 MB
MAX_ASPECT = 100.0  # longest side / shortest side


class ImageError(ValueError):
    """An image file that cannot be used; the message names the file and the reason."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"cannot read image {name}: {reason}")
        self.name, self.reason = name, reason


def read_rgb(path: str | Path, max_pixels: int = MAX_PIXELS, max_aspect: float = MAX_ASPECT) -> Tensor:
    """An image file as (3, H, W) float32 in [0, 1] (see the module doc for the conversions).

    Raises:
        FileNotFoundError: no file at ``path``.
        ImageError: the file cannot be decoded, or its size is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no image file at {path}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ImageError(str(path), f"cannot open the file ({e.strerror or e})") from e
    return decode_rgb(data, str(path), max_pixels, max_aspect)


def decode_rgb(data: bytes, name: str = "<bytes>", max_pixels: int = MAX_PIXELS,
               max_aspect: float = MAX_ASPECT) -> Tensor:
    """Encoded image bytes as (3, H, W) float32 in [0, 1]; ``name`` is used in error messages."""
    if not data:
        raise ImageError(name, "the file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                _check_size(im.size, name, max_pixels, max_aspect)
                im.load()  # decode now, inside the try: truncated data fails here
                array = _to_rgb_array(_upright(im, name))
    except ImageError:
        raise
    except UnidentifiedImageError as e:
        raise ImageError(name, "not an image format PIL can read (wrong extension, or not an image)") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(name, f"refused as a possible decompression bomb ({e})") from e
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, struct.error) as e:
        reason = str(e) or type(e).__name__
        if "truncated" in reason or isinstance(e, EOFError):
            reason = f"the file is truncated or corrupt ({reason})"
        else:
            reason = f"the data is corrupt or unsupported ({type(e).__name__}: {reason})"
        raise ImageError(name, reason) from e
    except MemoryError as e:
        raise ImageError(name, "not enough memory to decode it") from e
    return torch.from_numpy(array).permute(2, 0, 1).float() / 255  # (3, H, W)


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
        return ImageOps.exif_transpose(im)
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
    array = np.asarray(im.convert("RGB"), dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"mode {im.mode} gave an array of shape {array.shape}")
    return array.copy()
