"""Media of source rows: where it comes from (inline bytes or a file) and whether it decodes.

`prepare` checks every media item before a row is written: images are fully decoded (with
`lightrft_mm.processors.image.load_image`, the decoder training uses, where that module
exists; else with PIL); videos and audio must give frames and samples (`load_video` /
`load_audio` of the processors, else a PyAV stream of the right kind).
"""

from __future__ import annotations

import importlib.util
import io
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from lightrft_mm.errors import MediaError

# A header that declares more pixels than this is refused before decoding (see ImageConfig).
DEFAULT_MAX_PIXELS = 100_000_000
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_PIL_EXT = {"PNG": ".png", "JPEG": ".jpg", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp",
            "TIFF": ".tif", "MPO": ".jpg"}


@dataclass
class MediaItem:
    """One media item of a source row, before it is written into the output folder.

    Attributes:
        kind: image, video or audio.
        field: Where it sits in the source row (``images[0]``), for reject messages.
        data: Inline bytes (a Hugging Face ``{bytes, path}`` struct), or None.
        path: Absolute path of a file holding it, or None when ``data`` is given.
        in_place: The file is already inside the output folder (synthetic generators).
        ext: File extension of the written copy, with its dot; found by ``check``.
        ref: The path as the source row wrote it (for messages), when ``path`` is set.
        root: The data root the file must lie under: the folder relative paths are taken from.
    """

    kind: str
    field: str
    data: bytes | None = None
    path: str | None = None
    in_place: bool = False
    ext: str = ""
    ref: str | None = None
    root: str | None = None

    @property
    def size(self) -> int:
        """Bytes of the media (the inline bytes or the file size)."""
        return len(self.data) if self.data is not None else os.path.getsize(self.path)


def media_from_value(value: Any, kind: str, field: str, root: Path | None) -> list[MediaItem]:
    """Media items of one row value: a path, ``{bytes, path}`` struct, bytes, or a list of them.

    Args:
        value: The column value (None gives no items).
        kind: image, video or audio.
        field: The column name, used in messages (items get ``field[i]`` for lists).
        root: Folder that relative paths are taken from (``--media-root``).

    Raises:
        MediaError: A value of another type, or a URL (prepare works offline).
    """
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        items = []
        for i, v in enumerate(value):
            items.extend(media_from_value(v, kind, f"{field}[{i}]", root))
        return items
    if isinstance(value, (bytes, bytearray)):
        return [MediaItem(kind, field, data=bytes(value))]
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        if value.get("bytes"):
            item = MediaItem(kind, field, data=bytes(value["bytes"]))
            item.ext = Path(value.get("path") or "").suffix.lower()
            return [item]
        value = value.get("path")
        if not value:
            raise MediaError(f"{field}: the {kind} struct holds neither bytes nor a path. Fix: "
                             "fill one of them, or drop the row.")
    if not isinstance(value, str) or not value.strip():
        raise MediaError(f"{field}: {value!r} is not a {kind} path, a list of paths or a "
                         "{bytes, path} struct. Fix: map a column that holds the media.")
    base = str((root or Path.cwd()).absolute())
    return [MediaItem(kind, field, path=resolve_path(value, kind, field, root), ref=value, root=base)]


def resolve_path(value: str, kind: str, field: str, root: Path | None) -> str:
    """Absolute path of a media reference; URLs are refused (prepare reads local files only)."""
    if _URL.match(value) or value.startswith("data:"):
        raise MediaError(f"{field}: {kind} {value[:80]!r} is a URL; prepare reads local files only. "
                         "Fix: download the media and point --media-root at its folder.")
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = (root or Path.cwd()) / path
    return str(path.absolute())


def resolves_inside(path: str | Path, root: str | Path) -> bool:
    """Whether ``path``, with every symlink followed (``Path.resolve``), lies under ``root``."""
    try:
        return Path(path).resolve().is_relative_to(Path(root).resolve())
    except (OSError, RuntimeError):  # a symlink loop: nothing can be read there anyway
        return True


def outside_root_message(item: MediaItem, where: str) -> str | None:
    """Why a file item lies outside its data root (None when it does not, or holds bytes)."""
    if item.path is None or item.root is None or resolves_inside(item.path, item.root):
        return None
    return (f"{where}, {item.field}: {item.kind} path {item.ref!r} resolves to {Path(item.path).resolve()}, "
            f"outside the data root {Path(item.root).resolve()} (the folder relative media paths are taken "
            "from). Media outside the data root is refused, so that a dataset cannot pull other files "
            "into the shards. Fix: move the file under the data root (or point --media-root at a folder "
            "that holds it), or pass --allow-outside-media if you trust this source.")


def check(item: MediaItem, *, where: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Decode-check one media item and set its ``ext``.

    Raises:
        MediaError: Naming ``where`` (file and row), the field, the reason and the fix.
    """
    where = f"{where}, {item.field}"
    if item.data is None and not os.path.isfile(item.path):
        raise MediaError(f"{where}: {item.kind} file {item.path} does not exist. Fix: check the "
                         "path, or --media-root (relative paths are taken from it).")
    if item.kind == "image":
        fmt = _check_image(item, where, max_pixels)
        item.ext = item.ext or _PIL_EXT.get(fmt, "")
    else:
        _check_stream(item, where)
    if not item.ext:
        item.ext = Path(item.path).suffix.lower() if item.path else ""
    item.ext = item.ext or ".bin"


def _check_image(item: MediaItem, where: str, max_pixels: int) -> str:
    """Fully decode the image; returns its PIL format name (for the file extension)."""
    from PIL import Image, UnidentifiedImageError

    load = image_loader()
    if load is not None:  # the processors' decoder: the check training will apply
        load(item.data if item.data is not None else item.path, where=where, max_pixels_guard=max_pixels)
        if item.data is None or item.ext:
            return ""
        with Image.open(io.BytesIO(item.data)) as im:  # reads the header only
            return im.format or ""
    source = io.BytesIO(item.data) if item.data is not None else item.path
    try:
        with Image.open(source) as im:
            fmt = im.format or ""
            width, height = im.size
            if width * height > max_pixels:
                raise MediaError(f"{where}: image of {width}x{height} pixels is over the "
                                 f"{max_pixels} pixel guard. Fix: downscale it, or drop the row.")
            im.load()
    except MediaError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        what = f"{len(item.data)} inline bytes" if item.data is not None else item.path
        raise MediaError(f"{where}: cannot decode the image ({what}): {e}. Fix: re-export it "
                         "as PNG or JPEG, or drop the row.") from None
    return fmt


@lru_cache(maxsize=None)
def processor_fn(module: str, name: str):
    """``lightrft_mm.processors.<module>.<name>`` when that module exists, else None."""
    if importlib.util.find_spec(f"lightrft_mm.processors.{module}") is None:
        return None
    return getattr(importlib.import_module(f"lightrft_mm.processors.{module}"), name, None)


def image_loader():
    """``lightrft_mm.processors.image.load_image`` when that module exists, else None."""
    return processor_fn("image", "load_image")


def _check_stream(item: MediaItem, where: str) -> None:
    """A video must give frames, an audio clip samples (with the processors where they exist)."""
    if item.size == 0:
        raise MediaError(f"{where}: {item.kind} is empty (0 bytes). Fix: re-export it, or drop the row.")
    source = item.data if item.data is not None else item.path
    load_video = processor_fn("video", "load_video")
    if item.kind == "video" and item.path is not None and load_video is not None:
        load_video(item.path, fps=1.0, max_frames=2, where=where)
        return
    duration, load_audio = processor_fn("audio", "audio_duration"), processor_fn("audio", "load_audio")
    if item.kind == "audio" and duration is not None and load_audio is not None:
        seconds = duration(source, where=where)
        if not seconds > 0:
            raise MediaError(f"{where}: the audio holds no samples. Fix: re-export it, or drop the row.")
        load_audio(source, sampling_rate=16_000, end=min(seconds, 1.0), where=where)
        return
    _check_with_pyav(item, where)


def _check_with_pyav(item: MediaItem, where: str) -> None:
    """Without the processors: the file must open with PyAV and hold a stream of its kind."""
    if importlib.util.find_spec("av") is None:
        return
    import av

    source = io.BytesIO(item.data) if item.data is not None else item.path
    try:
        with av.open(source) as container:
            streams = container.streams.video if item.kind == "video" else container.streams.audio
            if not streams:
                raise MediaError(f"{where}: the file holds no {item.kind} stream. Fix: point the "
                                 f"column at a {item.kind} file, or drop the row.")
    except MediaError:
        raise
    except Exception as e:  # PyAV raises its own error family for every container problem
        raise MediaError(f"{where}: cannot open the {item.kind} ({item.path or 'inline bytes'}): "
                         f"{e}. Fix: re-encode it (e.g. ffmpeg -i in out.mp4), or drop the row.") from None
