"""Image decoding: every mode becomes RGB in [0, 1], every bad file one ImageError naming it."""

import io
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image, ImageFile

from funcmem.editing.images import FORMATS, MAGIC, ImageError, decode_rgb, decode_rgb8, probe, read_rgb, sniff


def encode(im: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a size but holds no pixels: what a decompression bomb looks like before decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


# ---------------------------------------------------------------- modes that convert


def test_rgba_is_composited_on_white():
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[..., 0] = 255  # red everywhere ...
    rgba[:2, :, 3] = 255  # ... opaque on the top half, transparent below
    x = decode_rgb(encode(Image.fromarray(rgba, "RGBA")))
    assert x.shape == (3, 4, 6) and x.dtype == torch.float32
    assert torch.equal(x[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(x[:, 3, 0], torch.ones(3))  # transparent -> white, not the hidden red


def test_palette_grayscale_and_bilevel_modes():
    p = Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4) * 20, "L").convert("P")
    assert decode_rgb(encode(p)).shape == (3, 3, 4)
    gray = decode_rgb(encode(Image.fromarray(np.full((5, 7), 51, np.uint8), "L")))
    assert torch.allclose(gray, torch.full((3, 5, 7), 0.2))
    bw = decode_rgb(encode(Image.new("1", (3, 2), 1)))
    assert torch.equal(bw, torch.ones(3, 2, 3))


def test_palette_with_a_transparent_index_becomes_white():
    p = Image.new("P", (2, 2), 0)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.putpixel((1, 1), 1)
    x = decode_rgb(encode(p, transparency=0))
    assert torch.equal(x[:, 0, 0], torch.ones(3)) and torch.equal(x[:, 1, 1], torch.tensor([1.0, 0.0, 0.0]))


def test_16_bit_grayscale_keeps_its_range():
    values = np.array([[0, 32768, 65535]], np.uint16)
    x = decode_rgb(encode(Image.fromarray(values)))
    torch.testing.assert_close(x[0, 0], torch.tensor([0.0, 128 / 255, 1.0]))  # not clipped at 255
    assert torch.equal(x[0], x[2])


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # no cyan, full magenta and yellow: red
    x = decode_rgb(encode(cmyk, "JPEG", quality=95))
    assert x.shape == (3, 8, 8)
    assert x[0].mean() > 0.9 and x[1].mean() < 0.1 and x[2].mean() < 0.1


def test_exif_orientation_is_applied():
    im = Image.new("RGB", (16, 8), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 8, 8))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    x = decode_rgb(encode(im, "JPEG", exif=exif, quality=100, subsampling=0))
    assert x.shape == (3, 16, 8)  # upright: portrait
    assert x[0, :6].mean() > 0.9 and x[2, -6:].mean() > 0.9  # the red half is now on top


def test_one_pixel_image():
    assert torch.equal(decode_rgb(encode(Image.new("RGB", (1, 1), (255, 255, 255)))), torch.ones(3, 1, 1))


# ---------------------------------------------------------------- files that are refused


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (b"just some text, renamed to .png", "not an image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not an image|corrupt"),
    (b"\xff\xd8 this is not a jpeg", "not an image|corrupt"),
])
def test_non_images_are_refused_with_the_file_name(tmp_path, data, reason):
    path = tmp_path / "photo.png"
    path.write_bytes(data)
    with pytest.raises(ImageError, match=rf"photo\.png.*({reason})") as info:
        read_rgb(path)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_are_refused(tmp_path, fmt):
    rng = np.random.default_rng(0)
    data = encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"cut\.\w+: .*(truncated|corrupt)"):
        read_rgb(path)


def test_decompression_bomb_is_refused_before_decoding():
    start = time.perf_counter()
    with pytest.raises(ImageError, match=r"bomb\.png: refused as a possible decompression bomb"):
        decode_rgb(png_header_only(100_000, 100_000), "bomb.png")  # PIL's own limit, at open
    with pytest.raises(ImageError, match=r"big\.png: 9000x5000 = 45,000,000 pixels exceeds the limit of 40,000,000"):
        decode_rgb(png_header_only(9000, 5000), "big.png")  # ours, before decoding
    with pytest.raises(ImageError, match="exceeds the limit of 100"):
        decode_rgb(encode(Image.new("RGB", (20, 20))), "small.png", max_pixels=100)
    assert time.perf_counter() - start < 2


def test_extreme_side_ratio_is_refused():
    with pytest.raises(ImageError, match="1x500 has a side ratio above 100"):
        decode_rgb(encode(Image.new("L", (1, 500))), "strip.png")


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_rgb(tmp_path / "nope.png")


def test_editing_readers_use_the_same_decoder(tmp_path):
    from funcmem.editing.apply import read_image
    from funcmem.editing.data import load_folder

    (tmp_path / "ok.png").write_bytes(encode(Image.new("RGBA", (3, 3), (0, 0, 0, 0))))
    assert torch.equal(read_image(tmp_path / "ok.png"), torch.ones(3, 3, 3))
    (tmp_path / "z.png").write_bytes(b"GIF89a nonsense")
    with pytest.raises(ImageError, match=r"z\.png"):
        read_image(tmp_path / "z.png")
    with pytest.raises(ImageError, match=r"z\.png") as info:
        load_folder(tmp_path)
    assert str(info.value).count("cannot read image") == 1


# ---------------------------------------------------------------- properties and fuzzing


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_random_bytes_give_an_image_or_an_image_error(data):
    try:
        x = decode_rgb(data, "fuzz.bin")
    except ImageError as e:
        assert str(e).startswith("cannot read image fuzz.bin: ")
    else:
        assert x.dim() == 3 and x.shape[0] == 3 and 0 <= float(x.min()) <= float(x.max()) <= 1


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["L", "LA", "P", "RGB", "RGBA", "I;16", "1"]), st.integers(1, 9), st.integers(1, 9),
       st.sampled_from(["PNG", "GIF", "BMP", "TIFF", "WEBP"]), st.data())
def test_every_mode_and_format_decodes_to_rgb_in_range(mode, w, h, fmt, data):
    if fmt == "GIF" and mode in ("I;16", "LA", "RGBA"):
        return
    rng = np.random.default_rng(w * 10 + h)
    if mode == "I;16":
        im = Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16))
    else:
        im = Image.fromarray(rng.integers(0, 255, (h, w, 4), dtype=np.uint8), "RGBA").convert(mode)
    try:
        encoded = encode(im, fmt)
    except (OSError, ValueError, KeyError):
        return  # PIL cannot write this mode in this format
    x = decode_rgb(encoded, f"img.{fmt.lower()}", formats=(fmt,))  # beyond the default three when asked
    assert x.shape == (3, h, w) and 0 <= float(x.min()) <= float(x.max()) <= 1


def _mutations(seed: int, n: int):
    """Valid images of several formats with bytes flipped, cut or inserted: the fuzz corpus."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)
    seeds = [encode(Image.fromarray(pixels), f) for f in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")]
    seeds.append(encode(Image.fromarray(pixels).convert("RGBA"), "PNG"))
    for i in range(n):
        data = bytearray(seeds[i % len(seeds)])
        kind = rng.integers(4)
        if kind == 0:
            for pos in rng.integers(0, len(data), rng.integers(1, 8)):
                data[pos] = rng.integers(256)
        elif kind == 1:
            data = data[: rng.integers(1, len(data))]
        elif kind == 2:
            pos = rng.integers(len(data))
            data[pos:pos] = rng.integers(0, 256, rng.integers(1, 64), dtype=np.uint8).tobytes()
        else:  # a huge size in the header
            pos = rng.integers(8, min(len(data), 32))
            data[pos:pos + 4] = b"\x7f\xff\xff\xff"
        yield bytes(data)


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL warns about the corrupt EXIF and TIFF tags we make
def test_fuzz_the_decoder_on_mutated_images():
    """A short fuzz target: ~4000 mutated files in well under a minute, never an unexpected exception."""
    start, outcomes = time.perf_counter(), {"ok": 0, "refused": 0}
    for data in _mutations(seed=0, n=4000):
        try:
            x = decode_rgb(data, "m.img", formats=tuple(MAGIC))  # every decoder the sniffer knows
            assert x.shape[0] == 3 and 0 <= float(x.min()) <= float(x.max()) <= 1
            outcomes["ok"] += 1
        except ImageError:
            outcomes["refused"] += 1
        if time.perf_counter() - start > 45:
            break
    assert outcomes["ok"] > 0 and outcomes["refused"] > 0


# ---------------------------------------------------------------- formats: a short list, recognised by magic number


def dds_unknown_pixel_format() -> bytes:
    """A DDS header with an unknown FourCC: PIL's DDS plugin raises NotImplementedError on it."""
    header = struct.pack("<7I", 124, 0x1007, 8, 8, 0, 0, 0) + b"\0" * 44
    header += struct.pack("<2I", 32, 0x4) + b"XYZW" + struct.pack("<5I", 0, 0, 0, 0, 0) + struct.pack("<5I", 0x1000, 0, 0, 0, 0)
    return b"DDS " + header + b"\0" * 256


def spider_stack_image() -> bytes:
    """A SPIDER header for an image inside a stack: PIL's plugin raises AttributeError on it."""
    h = [0.0] * 28
    h[1], h[2], h[5], h[12], h[13], h[22], h[23], h[24], h[27] = 1, 8, 1, 8, 1, 32, 32, 0, 1
    return struct.pack(">27f", *h[1:]) + b"\0" * 512


def test_only_png_jpeg_and_webp_are_decoded_by_default():
    assert FORMATS == ("PNG", "JPEG", "WEBP")
    pixels = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
    for fmt in FORMATS:
        data = encode(pixels, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        assert sniff(data) == fmt and probe(data) == (fmt, 4, 4)
        assert decode_rgb8(data).shape == (4, 4, 3)
    for fmt in ("BMP", "GIF", "TIFF"):
        data = encode(pixels, fmt)
        with pytest.raises(ImageError, match=rf"a {fmt} image, which is not accepted \(accepted: PNG, JPEG, WEBP\)"):
            decode_rgb(data, "x")
        assert decode_rgb(data, "x", formats=(fmt,)).shape == (3, 4, 4)  # allowed when asked for
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"  # would reach Ghostscript
    for data in (eps, dds_unknown_pixel_format(), spider_stack_image()):
        with pytest.raises(ImageError, match="not an image in an accepted format"):
            decode_rgb(data, "x")


def test_a_png_in_disguise_is_opened_by_the_png_decoder_only():
    """PIL is told the one format the magic number names: a JPEG renamed .png is a JPEG, and
    bytes claiming PNG but holding a DDS are not handed to the DDS plugin."""
    jpeg = encode(Image.new("RGB", (5, 3), (10, 200, 30)), "JPEG")
    assert probe(jpeg, "photo.png") == ("JPEG", 5, 3)
    fake = b"\x89PNG\r\n\x1a\n" + dds_unknown_pixel_format()
    with pytest.raises(ImageError, match="corrupt or unsupported|not a readable image"):
        decode_rgb(fake, "fake.png")


def test_any_exception_inside_pil_becomes_an_image_error(monkeypatch):
    """DDS and SPIDER once raised NotImplementedError / AttributeError from inside PIL; whatever a
    decoder raises is an ImageError naming the file, with the original chained."""
    data = encode(Image.new("RGB", (4, 4)))
    for error in (NotImplementedError("Unimplemented pixel format"), AttributeError("no attribute 'stkoffset'"),
                  KeyError("x"), RuntimeError("deep")):
        def broken(self, error=error):
            raise error
        monkeypatch.setattr(ImageFile.ImageFile, "load", broken)
        with pytest.raises(ImageError, match=rf"m\.png: the data is corrupt or unsupported \({type(error).__name__}") as info:
            decode_rgb(data, "m.png")
        assert info.value.__cause__ is error


def test_probe_reads_the_header_without_decoding(monkeypatch):
    big = png_header_only(6000, 4000)  # 24 MP declared, no pixel data
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("probe decoded pixels"))
    assert probe(big, "big.png") == ("PNG", 6000, 4000)
