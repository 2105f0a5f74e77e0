"""Image decoding: every bad-input row, mode conversions, EXIF, sources, the bomb guard, resize."""

from __future__ import annotations

import base64
import io
import math
import struct
import time
import tracemalloc
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from lightrft_mm.config import ImageConfig
from lightrft_mm.errors import MediaError
from lightrft_mm.processors.image import load_image, qwen_smart_resize, to_rgb

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


@pytest.fixture(scope="module")
def qwen_processor():
    from lightrft_mm.models.tiny import build_tiny

    return build_tiny("qwen2_5_vl")[1]


def solid(color, size=(16, 16), mode="RGB"):
    return Image.new(mode, size, color)


def png_with_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height RGB, followed by a few bytes of junk data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"\x00junk")
            + chunk(b"IEND", b""))


def flat(img) -> list[tuple[int, int, int]]:
    """The RGB pixels in row-major order."""
    assert img.mode == "RGB"
    return [tuple(int(v) for v in p) for p in np.asarray(img).reshape(-1, 3)]


def pixels(img) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img).astype(int)


# --- bad input ------------------------------------------------------------------------------

def test_missing_path_names_file_and_sample(tmp_path):
    path = tmp_path / "nope.png"
    with pytest.raises(MediaError, match="does not exist") as e:
        load_image(path, where="sample s1")
    assert str(path) in str(e.value) and str(e.value).startswith("sample s1: ")


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(MediaError, match=r"empty \(0 bytes\)") as e:
        load_image(path)
    assert str(path) in str(e.value)


def test_text_file_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n" * 10)
    with pytest.raises(MediaError, match="not an image PIL can read") as e:
        load_image(str(path), where="sample t")
    assert str(path) in str(e.value)


def test_directory_is_refused(tmp_path):
    with pytest.raises(MediaError, match="not a file"):
        load_image(tmp_path)


def test_truncated_jpeg_is_an_error_not_grey(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # nothing imported so far switched it on
    with pytest.raises(MediaError, match="truncated") as e:
        load_image(path)
    assert str(path) in str(e.value)
    # A library that turns truncated loading on would make this silently grey: refuse instead.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(MediaError, match="LOAD_TRUNCATED_IMAGES"):
        load_image(path)


def test_one_pixel_image_through_qwen_processor(tmp_path, qwen_processor):
    path = tmp_path / "dot.png"
    solid(RED, (1, 1)).save(path)
    img = load_image(path)
    assert img.size == (1, 1) and img.getpixel((0, 0)) == RED
    out = qwen_processor(text=["<|vision_start|><|image_pad|><|vision_end|>hi"], images=[img],
                         return_tensors="pt")
    t, h, w = out["image_grid_thw"][0].tolist()
    ip = qwen_processor.image_processor
    expect = qwen_smart_resize(1, 1, factor=ip.patch_size * ip.merge_size,
                               min_pixels=ip.size["shortest_edge"], max_pixels=ip.size["longest_edge"])
    assert (t, h * ip.patch_size, w * ip.patch_size) == (1, *expect)
    assert out["pixel_values"].shape[0] == t * h * w
    pad = qwen_processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((out["input_ids"] == pad).sum()) == t * h * w // ip.merge_size ** 2


def test_bad_base64_data_url():
    with pytest.raises(MediaError, match="not valid base64"):
        load_image("data:image/png;base64,!!!not*base64!!!", where="sample b")
    with pytest.raises(MediaError, match="no ','"):
        load_image("data:image/png;base64")


def test_unsupported_sources():
    with pytest.raises(MediaError, match="remote URL"):
        load_image("https://example.com/cat.png")
    with pytest.raises(MediaError, match="from a int"):
        load_image(42)
    with pytest.raises(MediaError, match="empty"):
        load_image(b"")


# --- the decompression-bomb guard -----------------------------------------------------------

def _forbid_decoding(monkeypatch):
    def boom(self, *a, **k):
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", boom)
    monkeypatch.setattr(Image.Image, "load", boom)


def test_huge_png_header_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_with_header(30000, 30000))
    before = Image.MAX_IMAGE_PIXELS
    _forbid_decoding(monkeypatch)
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(MediaError) as e:
        load_image(path, where="sample big")
    elapsed = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    msg = str(e.value)
    assert "900,000,000 pixels" in msg and "100,000,000" in msg and "image.max_pixels_guard" in msg
    assert str(path) in msg and msg.startswith("sample big: ")
    assert elapsed < 1.0 and peak < 5_000_000  # decoding would need 2.7 GB
    assert Image.MAX_IMAGE_PIXELS == before  # PIL's global is left as it was


@pytest.mark.parametrize("side", [40, 50])  # 1600 px: PIL would only warn; 2500 px: PIL raises
def test_guard_refuses_just_above_limit_without_warning(tmp_path, monkeypatch, side):
    path = tmp_path / "img.png"
    solid(RED, (side, side)).save(path)
    _forbid_decoding(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning leaks out
        with pytest.raises(MediaError, match=f"{side * side:,} pixels.*1,000 .*image.max_pixels_guard"):
            load_image(path, max_pixels_guard=1000)


def test_guard_allows_up_to_limit_and_applies_to_pil_sources(tmp_path):
    img = solid(BLUE, (40, 25))
    assert load_image(img, max_pixels_guard=1000).size == (40, 25)
    with pytest.raises(MediaError, match="40x26 = 1,040 pixels"):
        load_image(solid(BLUE, (40, 26)), max_pixels_guard=1000)


def test_guard_above_pil_limit_is_honoured(tmp_path, monkeypatch):
    # PIL re-checks TIFF tiles while decoding; a guard raised above PIL's own limit must win.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = tmp_path / "wide.tif"
    solid(RED, (60, 60)).save(path)
    img = load_image(path, max_pixels_guard=10_000)
    assert img.size == (60, 60) and img.getpixel((5, 5)) == RED
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_config_guard_reaches_the_adapter(tmp_path, qwen_processor):
    from lightrft_mm.processors.adapter import HFChatAdapter
    from lightrft_mm.schema import Sample

    path = tmp_path / "big.png"
    solid(RED, (2000, 2000)).save(path)
    sample = Sample.from_dict({"id": "g", "messages": [{"role": "user", "content": [
        {"type": "image", "image": str(path)}, {"type": "text", "text": "colour?"}]}]})
    strict = HFChatAdapter(qwen_processor, image=ImageConfig(max_pixels_guard=1_000_000))
    with pytest.raises(MediaError, match="sample g: .*4,000,000 pixels.*image.max_pixels_guard"):
        strict.encode_one(sample)
    loose = HFChatAdapter(qwen_processor, image=ImageConfig(max_pixels_guard=4_000_000))
    assert loose.encode_one(sample).media["image_grid_thw"].tolist() == [[1, 6, 6]]


# --- animation, EXIF, sources ---------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_keeps_first_frame(tmp_path, fmt):
    frames = [solid(c, (20, 20)) for c in (RED, (0, 255, 0), BLUE)]
    path = tmp_path / f"anim.{fmt.lower()}"
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    frames[0].save(path, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **kwargs)
    with Image.open(path) as check:
        assert check.n_frames == 3
    arr = pixels(load_image(path))
    assert np.abs(arr - np.array(RED)).max() <= 2
    with pytest.raises(MediaError, match="animated \\(3 frames\\)"):
        load_image(path, animated="fail")


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), RED)
    img.paste(BLUE, (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90-degree clockwise turn
    path = tmp_path / "rot.jpg"
    img.save(path, "JPEG", quality=98, exif=exif)
    out = load_image(path)
    assert out.size == (20, 40)
    arr = pixels(out)
    assert np.abs(arr[5, 10] - RED).max() < 30 and np.abs(arr[35, 10] - BLUE).max() < 30


def test_bytes_pil_and_data_url_sources(tmp_path):
    buf = io.BytesIO()
    solid(BLUE, (8, 6)).save(buf, "PNG")
    data = buf.getvalue()
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    for source in (data, bytearray(data), url, solid(BLUE, (8, 6)), Image.open(io.BytesIO(data))):
        img = load_image(source)
        assert img.mode == "RGB" and img.size == (8, 6) and img.getpixel((3, 3)) == BLUE
    pil = solid(RED, (4, 4))
    assert load_image(pil) is not pil  # the caller's image is never modified


def test_returned_image_is_detached_from_the_file(tmp_path):
    path = tmp_path / "a.png"
    solid(RED, (8, 8)).save(path)
    img = load_image(path)
    path.unlink()  # the file is closed and the pixels are in memory
    assert img.getpixel((1, 1)) == RED


# --- mode conversions -----------------------------------------------------------------------

def test_rgba_and_la_composite_on_white():
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(255, 0, 0, 255), (255, 0, 0, 0), (0, 0, 0, 128)])
    assert flat(load_image(rgba)) == [RED, WHITE, (127, 127, 127)]
    la = Image.new("LA", (2, 1))
    la.putdata([(0, 0), (0, 255)])
    assert flat(load_image(la)) == [WHITE, (0, 0, 0)]


def test_palette_with_and_without_transparency(tmp_path):
    p = Image.new("P", (2, 1))
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.putdata([0, 1])
    assert flat(load_image(p)) == [RED, BLUE]
    path = tmp_path / "t.png"
    p.save(path, transparency=1)
    assert flat(load_image(path)) == [RED, WHITE]


def test_rgb_png_with_transparent_colour(tmp_path):
    img = Image.new("RGB", (2, 1))
    img.putpixel((0, 0), RED)
    img.putpixel((1, 0), BLUE)
    path = tmp_path / "trns.png"
    img.save(path, transparency=RED)  # tRNS chunk: every red pixel is transparent
    assert flat(load_image(path)) == [WHITE, BLUE]


def test_grey_and_bilevel():
    assert load_image(solid(77, mode="L")).getpixel((0, 0)) == (77, 77, 77)
    assert load_image(solid(1, mode="1")).getpixel((0, 0)) == WHITE


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 256, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as raw:
        assert raw.mode.startswith("I;16") or raw.mode == "I"
    got = [p[0] for p in flat(load_image(path))]
    assert got == [0, 1, 128, 255]  # clipping would give [0, 255, 255, 255]


@pytest.mark.parametrize("values, expect", [
    ([0, 100, 255], [0, 100, 255]),            # 8-bit data held in 32 bits: kept
    ([0, 256, 65535], [0, 1, 255]),            # 16-bit data: scaled by 255/65535
    ([-1000, 0, 1000], [0, 128, 255]),         # anything else: min-max
])
def test_int32_mode(values, expect):
    img = Image.fromarray(np.array([values], dtype=np.int32))
    assert img.mode == "I"
    assert [p[0] for p in flat(to_rgb(img))] == expect


@pytest.mark.parametrize("values, expect", [
    ([0.0, 0.5, 1.0], [0, 128, 255]),          # unit range
    ([0.0, 100.0, 255.0], [0, 100, 255]),      # byte range
    ([-1.0, 0.0, 3.0], [0, 64, 255]),          # min-max
])
def test_float_mode(values, expect, tmp_path):
    img = Image.fromarray(np.array([values], dtype=np.float32))
    assert img.mode == "F"
    path = tmp_path / "f.tif"
    img.save(path)
    assert [p[0] for p in flat(load_image(path))] == expect


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (255, 0, 0, 0)).save(path, "JPEG", quality=100)
    arr = pixels(load_image(path))
    assert np.abs(arr - np.array((0, 255, 255))).max() < 8  # full cyan


# --- Qwen2-VL's resize rule -----------------------------------------------------------------

def _sizes():
    rng = np.random.default_rng(0)
    sizes = [(1, 1), (1, 200), (1, 201), (200, 1), (201, 1), (14, 14), (27, 29), (28, 28),
             (42, 42), (56, 56), (84, 84), (100, 20000), (50000, 50000), (30000, 30000),
             (3, 700), (1000, 5), (10**6, 10**6 // 150), (8192, 41)]
    sizes += [tuple(int(x) for x in np.exp(rng.uniform(0, math.log(40000), 2))) for _ in range(1500)]
    sizes += [(h, w) for h in range(1, 120, 7) for w in range(1, 400, 13)]
    return sizes


@pytest.mark.parametrize("factor, min_pixels, max_pixels", [
    (28, 56 * 56, 28 * 28 * 1280), (28, 84 * 84, 84 * 84), (28, 4 * 28 * 28, 16384 * 28 * 28),
    (32, 64 * 64, 32 * 32 * 1024), (14, 14 * 14, 14 * 14 * 64)])
def test_smart_resize_parity_with_transformers(factor, min_pixels, max_pixels):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    raised = 0
    for h, w in _sizes():
        try:
            want = smart_resize(h, w, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
        except ValueError:
            raised += 1
            with pytest.raises(MediaError, match="aspect ratio"):
                qwen_smart_resize(h, w, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
            continue
        got = qwen_smart_resize(h, w, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
        assert got == tuple(want), (h, w)
        assert got[0] % factor == 0 and got[1] % factor == 0
    assert raised >= 4  # the extreme aspect ratios were exercised


def test_smart_resize_refuses_empty_side():
    with pytest.raises(MediaError, match="empty side"):
        qwen_smart_resize(0, 10)
