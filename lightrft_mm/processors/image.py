"""Image decoding for every model family: any source -> one RGB `PIL.Image`, or a MediaError.

`load_image` accepts a path, raw bytes, a PIL image or a base64 data URL. It refuses images
whose header declares more pixels than a guard *before* decoding them (decompression bombs),
turns truncated or mislabelled files into errors instead of grey or garbage pixels, applies the
EXIF orientation, keeps the first frame of animations, and converts every PIL mode to RGB
(transparency composited on white, 16-bit and float data scaled rather than clipped).

`qwen_smart_resize` is Qwen2-VL's resize rule, written here because `qwen-vl-utils` imports
torchvision (DESIGN.md §10); a test holds it to exact parity with transformers' version.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
import threading
import urllib.parse
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from lightrft_mm.errors import ConfigError, MediaError

DEFAULT_MAX_PIXELS_GUARD = 100_000_000
ANIMATED_POLICIES = ("first", "fail")
GUARD_KEY = "image.max_pixels_guard"

# PIL keeps its decompression-bomb limit in a module global; calls that align it with their
# own guard take turns, so one call never restores a value another call is relying on.
_PIL_LIMIT_LOCK = threading.Lock()


def load_image(source, *, where: str = "", max_pixels_guard: int = DEFAULT_MAX_PIXELS_GUARD,
               animated: str = "first"):
    """Decode an image into RGB, refusing bombs, truncated files and non-images.

    Args:
        source: a path (str or Path), bytes, a PIL image, or a "data:image/...;base64,..." URL.
        where: context put in front of every error message (e.g. "sample geo3k-17").
        max_pixels_guard: refuse images whose header declares more pixels than this, before
            any pixel is decoded (config key `image.max_pixels_guard`).
        animated: "first" keeps the first frame of an animated GIF/WebP/APNG; "fail" refuses
            animations.

    Returns:
        A loaded `PIL.Image.Image` in mode RGB, independent of any open file.

    Raises:
        MediaError: the source is missing, empty, not an image, truncated, over the guard, or
            animated under `animated="fail"`.
    """
    from PIL import Image

    if animated not in ANIMATED_POLICIES:
        raise ConfigError(f"load_image: animated={animated!r} is not one of {ANIMATED_POLICIES}.")
    if not isinstance(max_pixels_guard, int) or max_pixels_guard < 1:
        raise ConfigError(f"{GUARD_KEY}={max_pixels_guard!r} must be a positive integer.")
    if isinstance(source, Image.Image):
        label = f"<PIL image {source.width}x{source.height} {source.mode}>"
        _check_pixels(source.size, label, where, max_pixels_guard)
        img = _decode(lambda: source, label, where, max_pixels_guard, animated, owned=False)
    else:
        opener, label = _opener(source, where)
        img = _decode(opener, label, where, max_pixels_guard, animated, owned=True)
    return to_rgb(img)


def _prefix(where: str) -> str:
    return f"{where}: " if where else ""


def _opener(source, where: str):
    """A zero-argument function that opens the source lazily, and a label for messages."""
    from PIL import Image

    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        label = f"<{len(data)} bytes>"
        if not data:
            raise MediaError(f"{_prefix(where)}image {label} is empty. Pass the file's content.")
        return (lambda: Image.open(io.BytesIO(data))), label
    if isinstance(source, str) and source.startswith("data:"):
        data = _data_url_bytes(source, where)
        return (lambda: Image.open(io.BytesIO(data))), f"<data URL, {len(data)} bytes>"
    if isinstance(source, str) and re.match(r"^[a-z][a-z0-9+.-]*://", source, re.I):
        raise MediaError(f"{_prefix(where)}image {source} is a remote URL. Download it first "
                         "(training and prepare read local files only).")
    if not isinstance(source, (str, Path)):
        raise MediaError(f"{_prefix(where)}cannot read an image from a {type(source).__name__}. "
                         "Pass a path, bytes, a PIL image or a base64 data URL.")
    path = Path(source)
    if not path.exists():
        raise MediaError(f"{_prefix(where)}image file {path} does not exist. Fix the path "
                         "(media paths in a shard are relative to the shard's folder).")
    if not path.is_file():
        raise MediaError(f"{_prefix(where)}image path {path} is not a file. Point it at an image file.")
    if path.stat().st_size == 0:
        raise MediaError(f"{_prefix(where)}image file {path} is empty (0 bytes). Re-export or "
                         "re-download it, or drop the row.")
    return (lambda: Image.open(path)), str(path)


def _data_url_bytes(url: str, where: str) -> bytes:
    """The payload of a data URL (base64 or percent-encoded)."""
    label = f"data URL {url[:40]}..." if len(url) > 40 else f"data URL {url}"
    header, comma, payload = url.partition(",")
    if not comma:
        raise MediaError(f"{_prefix(where)}{label} has no ',' before its data. Expected "
                         "'data:image/png;base64,<base64 bytes>'.")
    if header.endswith(";base64"):
        try:
            data = base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError) as e:
            raise MediaError(f"{_prefix(where)}{label} is not valid base64 ({e}). Re-encode the "
                             "image with base64.b64encode.") from e
    else:
        data = urllib.parse.unquote_to_bytes(payload)
    if not data:
        raise MediaError(f"{_prefix(where)}{label} holds no data. Embed the image's bytes.")
    return data


def _check_pixels(size, label: str, where: str, guard: int) -> None:
    width, height = size
    if width * height > guard:
        raise MediaError(
            f"{_prefix(where)}image {label} declares {width}x{height} = {width * height:,} pixels, "
            f"more than the limit of {guard:,} ({GUARD_KEY}); it was not decoded. Downscale the "
            f"image, or raise {GUARD_KEY} if you trust the file.")


def _bomb_error(label: str, where: str, guard: int, err: Exception) -> MediaError:
    """PIL's own bomb check fired: report it like ours (its message only gives a pixel count)."""
    found = re.search(r"\((\d+) pixels\)", str(err))
    size = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
    return MediaError(
        f"{_prefix(where)}image {label} declares {size}, more than the limit of {guard:,} "
        f"({GUARD_KEY}); it was not decoded. Downscale the image, or raise {GUARD_KEY} if you "
        "trust the file.")


@contextmanager
def _pil_limit(guard: int):
    """Within the block, PIL's bomb check uses `guard` and its warning raises.

    PIL warns (not raises) between its limit and twice its limit; as an exception the warning
    stops `Image.open` before any decoding, and the global is restored on exit.
    """
    from PIL import Image

    with _PIL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = guard
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _decode(opener, label: str, where: str, guard: int, animated: str, *, owned: bool):
    """Open (header only), check the guard, then decode the first frame and apply EXIF."""
    from PIL import Image, ImageFile, UnidentifiedImageError

    bombs = (Image.DecompressionBombError, Image.DecompressionBombWarning)
    try:
        with _pil_limit(guard):
            img = opener()
    except bombs as e:
        raise _bomb_error(label, where, guard, e) from e
    except UnidentifiedImageError as e:
        raise MediaError(f"{_prefix(where)}{label} is not an image PIL can read (wrong extension, "
                         "a text/HTML file, or an unsupported format). Re-export it as PNG/JPEG "
                         "or drop the row.") from e
    except OSError as e:
        raise MediaError(f"{_prefix(where)}cannot open image {label}: {e}.") from e
    try:
        _check_pixels(img.size, label, where, guard)
        if animated == "fail" and getattr(img, "is_animated", False):
            raise MediaError(f"{_prefix(where)}image {label} is animated ({img.n_frames} frames). "
                             "Use a video part for animations, or load_image(animated='first').")
        # Decoding only needs the global limit held when the guard allows more than PIL's
        # default (TIFF tiles and GIF frames are checked again while loading).
        hold = Image.MAX_IMAGE_PIXELS is not None and guard > 2 * Image.MAX_IMAGE_PIXELS
        if ImageFile.LOAD_TRUNCATED_IMAGES:
            raise MediaError(f"{_prefix(where)}PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True, so "
                             f"a truncated {label} would decode as grey pixels. Some imported "
                             "library set it; set it back to False.")
        with _pil_limit(guard) if hold else _nothing():
            img.load()
        return _upright(img)
    except bombs as e:
        raise _bomb_error(label, where, guard, e) from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise MediaError(f"{_prefix(where)}cannot decode image {label}: {e}. The file is "
                         "truncated or corrupt; re-export or re-download it, or drop the row.") from e
    finally:
        if owned:
            img.close()


@contextmanager
def _nothing():
    yield


def _upright(img):
    """A copy turned as its EXIF orientation says; a malformed EXIF block leaves it as stored."""
    from PIL import ImageOps

    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - the pixels decoded fine; only the metadata is bad
        return img.copy()


def to_rgb(img):
    """Any PIL mode -> RGB: transparency on white, 16-bit/int/float data scaled to 8 bits.

    Args:
        img: a loaded PIL image.

    Returns:
        A new RGB image (the input is not modified).
    """
    from PIL import Image

    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(img), mode)).convert("RGB")
    # P, L and RGB images can name one transparent colour (PNG tRNS, GIF) instead of an alpha band.
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.copy() if mode == "RGB" else img.convert("RGB")


def _to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Scale single-channel wide data to uint8 by its type's range, not by clipping.

    16-bit data maps 0..65535 to 0..255. 32-bit integer ("I") data is read as 8-bit when it fits
    in 0..255, as 16-bit when it fits in 0..65535 (older PIL opened 16-bit PNGs as "I"), and is
    min-max scaled otherwise. Float ("F") data in [0, 1] is scaled by 255, data in [0, 255] kept,
    anything else min-max scaled.
    """
    arr = arr.astype(np.float64)
    finite = arr[np.isfinite(arr)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if mode.startswith("I;16"):
        scaled = arr * (255.0 / 65535.0)
    elif mode == "F" and lo >= 0.0 and hi <= 1.0:
        scaled = arr * 255.0
    elif lo >= 0.0 and hi <= 255.0:
        scaled = arr
    elif mode == "I" and lo >= 0.0 and hi <= 65535.0:
        scaled = arr * (255.0 / 65535.0)
    else:
        scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    return np.clip(np.rint(np.nan_to_num(scaled, nan=0.0)), 0, 255).astype(np.uint8)


def qwen_smart_resize(height: int, width: int, *, factor: int = 28, min_pixels: int = 56 * 56,
                      max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """Qwen2-VL's resize rule: the (height, width) the image processor resizes an image to.

    Both sides become multiples of `factor` (patch size x merge size), the area lands within
    [min_pixels, max_pixels], and the aspect ratio is kept as closely as that allows.

    Args:
        height, width: the image's size in pixels.
        factor: side multiple (28 for Qwen2-VL / Qwen2.5-VL: patch 14 x spatial merge 2).
        min_pixels, max_pixels: bounds on the resized area.

    Returns:
        (resized_height, resized_width).

    Raises:
        MediaError: a side is not positive, or the aspect ratio exceeds 200 (the model
            cannot represent it).
    """
    if height < 1 or width < 1:
        raise MediaError(f"image size {width}x{height} has an empty side; it cannot be resized.")
    ratio = max(height, width) / min(height, width)
    if ratio > 200:
        raise MediaError(f"image size {width}x{height} has aspect ratio {ratio:.1f}, above Qwen2-VL's "
                         "limit of 200. Crop or pad the image before using it.")
    # Python's round() (half to even) on purpose: transformers uses it, and parity is tested.
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar
