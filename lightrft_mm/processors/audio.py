"""Audio decoding: any audio file (or a video's audio track) -> float32 mono at a given rate.

Backends, without torchaudio (DESIGN.md §10): soundfile for wav/flac/ogg and friends, PyAV
for mp3 and the audio of mp4/mkv/webm (and whenever soundfile cannot read a file), torchaudio
as a last resort only where it imports. Channels are averaged to mono, `soxr` resamples (high
quality), `[start, end)` cuts a clip, and a duration guard clips or refuses long audio, reading
no more than the guard needs.
"""

from __future__ import annotations

import io
import numbers
from pathlib import Path

import numpy as np

from lightrft_mm.errors import ConfigError, MediaError

SOUNDFILE_SUFFIXES = {".wav", ".wave", ".flac", ".ogg", ".oga", ".aif", ".aiff", ".aifc", ".au",
                      ".snd", ".w64", ".rf64", ".caf"}
ON_TOO_LONG = ("clip", "fail")

# PyAV sample formats (packed and planar) -> how to map them onto [-1, 1].
_INT_SCALE = {"u8": (128.0, 128.0), "s16": (0.0, 32768.0), "s32": (0.0, 2147483648.0),
              "s64": (0.0, 9223372036854775808.0)}


def load_audio(source, *, sampling_rate: int, start: float | None = None, end: float | None = None,
               max_seconds: float = 30.0, on_too_long: str = "clip", where: str = "") -> np.ndarray:
    """Decode audio into a float32 mono waveform at `sampling_rate`.

    Args:
        source: a path (str or Path) or the file's bytes.
        sampling_rate: output rate in Hz (the feature extractor's, e.g. 16000).
        start, end: keep `[start, end)` in seconds of the source (None: its start / its end;
            an end past the duration stops at the duration).
        max_seconds: longest clip kept (config key `audio.max_seconds`).
        on_too_long: "clip" keeps the first max_seconds of the clip, "fail" raises
            (config key `audio.on_too_long`).
        where: context put in front of every error message (e.g. "sample a-3").

    Returns:
        [S] float32 in [-1, 1] (for integer sources), S ≈ clip seconds x sampling_rate.

    Raises:
        MediaError: missing, empty or undecodable file, no samples or no audio stream, a
            start/end outside the audio, or a clip over max_seconds with on_too_long="fail".
    """
    _check_args(sampling_rate, max_seconds, on_too_long)
    src, label = _resolve(source, where)
    window = _Window(start, end, max_seconds, on_too_long, label, where)
    samples, rate = _decode(src, label, where, window)
    mono = samples[:, 0] if samples.shape[1] == 1 else samples.mean(axis=1, dtype=np.float64)
    mono = mono.astype(np.float32, copy=False)
    if rate != sampling_rate:
        import soxr

        mono = soxr.resample(mono, rate, int(sampling_rate), quality="HQ").astype(np.float32, copy=False)
    return np.ascontiguousarray(mono)


def audio_duration(source, *, where: str = "") -> float:
    """Duration in seconds, from the header where the format has one (else by decoding).

    Args:
        source: a path or the file's bytes.
        where: context put in front of error messages.
    """
    src, label = _resolve(source, where)
    try:
        import soundfile as sf

        info = sf.info(_rewind(src))
        if info.frames > 0 or info.samplerate > 0:
            return info.frames / info.samplerate
    except Exception:  # noqa: BLE001 - any soundfile failure means: ask PyAV
        pass
    import av

    try:
        with av.open(_rewind(src)) as container:
            stream = _audio_stream(container, label, where)
            if stream.duration and stream.time_base:
                return float(stream.duration * stream.time_base)
            if container.duration:
                return container.duration / av.time_base
    except MediaError:
        raise
    except (av.FFmpegError, OSError, ValueError):
        pass
    whole = _Window(None, None, float("inf"), "clip", label, where)
    samples, rate = _decode(src, label, where, whole)
    return samples.shape[0] / rate


def _prefix(where: str) -> str:
    return f"{where}: " if where else ""


def _check_args(sampling_rate, max_seconds, on_too_long) -> None:
    if not isinstance(sampling_rate, numbers.Integral) or isinstance(sampling_rate, bool) or sampling_rate < 1:
        raise ConfigError(f"load_audio: sampling_rate={sampling_rate!r} must be a positive integer "
                          "(the feature extractor's sampling_rate, e.g. 16000).")
    if on_too_long not in ON_TOO_LONG:
        raise ConfigError(f"audio.on_too_long={on_too_long!r} is not one of {ON_TOO_LONG}.")
    if not max_seconds > 0:
        raise ConfigError(f"audio.max_seconds={max_seconds!r} must be > 0.")


def _resolve(source, where: str):
    """The object the decoders read (a path string or a BytesIO) and a label for messages."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise MediaError(f"{_prefix(where)}audio <0 bytes> is empty. Pass the file's content.")
        return io.BytesIO(data), f"<{len(data)} bytes>"
    if not isinstance(source, (str, Path)):
        raise MediaError(f"{_prefix(where)}cannot read audio from a {type(source).__name__}. "
                         "Pass a path or the file's bytes.")
    path = Path(source)
    if not path.exists():
        raise MediaError(f"{_prefix(where)}audio file {path} does not exist. Fix the path "
                         "(media paths in a shard are relative to the shard's folder).")
    if not path.is_file():
        raise MediaError(f"{_prefix(where)}audio path {path} is not a file. Point it at an audio file.")
    if path.stat().st_size == 0:
        raise MediaError(f"{_prefix(where)}audio file {path} is empty (0 bytes). Re-export or "
                         "re-download it, or drop the row.")
    return str(path), str(path)


def _rewind(src):
    if isinstance(src, io.BytesIO):
        src.seek(0)
    return src


class _Window:
    """Which samples to keep: [start, end) in seconds, capped by the duration guard."""

    def __init__(self, start, end, max_seconds, on_too_long, label, where):
        self.start, self.end = start, end
        self.max_seconds, self.on_too_long = max_seconds, on_too_long
        self.label, self.where = label, where
        pre = f"{_prefix(where)}audio {label}"
        if start is not None and start < 0:
            raise MediaError(f"{pre}: start={start} is negative. Use a time in seconds >= 0.")
        if end is not None and end <= (start or 0.0):
            raise MediaError(f"{pre}: start={start or 0.0} is not before end={end}. A clip needs "
                             "start < end (both in seconds from the beginning of the file).")

    def samples_needed(self, rate: int) -> int | None:
        """How many samples from the beginning suffice (one past the guard, to detect 'too long')."""
        stop = float("inf") if self.end is None else self.end * rate
        if np.isfinite(self.max_seconds):
            stop = min(stop, (self.start or 0.0) * rate + self.max_seconds * rate + 1)
        return None if not np.isfinite(stop) else int(np.ceil(stop)) + 1

    def bounds(self, available: int, rate: int, *, complete: bool) -> tuple[int, int]:
        """[s0, s1) sample indices, given `available` samples (all of them when `complete`)."""
        pre = _prefix(self.where)
        if available == 0 and complete:
            raise MediaError(f"{pre}audio {self.label} contains no samples. Re-export it or drop the row.")
        s0 = int(round((self.start or 0.0) * rate))
        if s0 >= available and complete:
            raise MediaError(f"{pre}audio start={self.start} s is at or beyond the end of {self.label} "
                             f"({available / rate:.3f} s long). Use a start inside the audio.")
        s1 = available if self.end is None else min(available, int(round(self.end * rate)))
        limit = max(1, int(round(self.max_seconds * rate))) if np.isfinite(self.max_seconds) else None
        if limit is not None and s1 - s0 > limit:
            if self.on_too_long == "fail":
                total = f" (the file lasts {available / rate:.2f} s)" if complete else ""
                raise MediaError(
                    f"{pre}audio {self.label}: the clip from {s0 / rate:.2f} s lasts more than "
                    f"audio.max_seconds={self.max_seconds} s{total} and audio.on_too_long=fail. "
                    "Set audio.on_too_long=clip to keep the first audio.max_seconds, raise "
                    "audio.max_seconds, or cut the clip with start/end.")
            s1 = s0 + limit
        return s0, s1


def _decode(src, label: str, where: str, window: _Window) -> tuple[np.ndarray, int]:
    """[S, C] float32 samples of the window, and their rate; tries each backend in turn."""
    errors = []
    use_soundfile = isinstance(src, io.BytesIO) or Path(src).suffix.lower() in SOUNDFILE_SUFFIXES
    backends = ([_decode_soundfile] if use_soundfile else []) + [_decode_pyav, _decode_torchaudio]
    for backend in backends:
        try:
            result = backend(_rewind(src), window)
        except MediaError:
            raise
        except ImportError as e:
            errors.append(f"{backend.__name__[8:]} is not installed ({e})")
            continue
        except Exception as e:  # noqa: BLE001 - each backend fails in its own way; report all
            errors.append(f"{backend.__name__[8:]}: {type(e).__name__}: {e}")
            continue
        if result is not None:
            return result
    raise MediaError(f"{_prefix(where)}cannot decode audio {label} ({'; '.join(errors)}). The file is "
                     "corrupt or not audio; re-export it (wav/flac/mp3) or drop the row.")


def _decode_soundfile(src, window: _Window):
    """Read only the window's frames: soundfile headers give the length up front."""
    import soundfile as sf

    with sf.SoundFile(src) as f:
        s0, s1 = window.bounds(f.frames, f.samplerate, complete=True)
        if f.seekable():
            f.seek(s0)
        else:
            f.read(s0, dtype="float32")  # a few formats only read forward
        data = f.read(s1 - s0, dtype="float32", always_2d=True)
        return data, f.samplerate


def _decode_pyav(src, window: _Window):
    """Decode the first audio stream from the beginning, stopping once the window is covered."""
    import av

    with av.open(src) as container:
        stream = _audio_stream(container, window.label, window.where)
        rate = stream.codec_context.sample_rate or stream.rate
        need = window.samples_needed(rate)
        chunks, count, complete = [], 0, True
        for frame in container.decode(stream):
            chunk = _frame_to_float(frame)
            chunks.append(chunk)
            count += chunk.shape[0]
            if need is not None and count >= need:
                complete = False
                break
        if count == 0:
            # Probing accepts many byte soups as some audio format; none of them decodes.
            raise ValueError("the audio stream decoded to no samples")
        samples = np.concatenate(chunks)
    s0, s1 = window.bounds(count, rate, complete=complete)
    return samples[s0:s1], rate


def _audio_stream(container, label: str, where: str):
    if not container.streams.audio:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise MediaError(f"{_prefix(where)}{label} has no audio stream (streams: {', '.join(kinds)}). "
                         "Use a file with an audio track, or drop the audio part.")
    return container.streams.audio[0]


def _frame_to_float(frame) -> np.ndarray:
    """One PyAV audio frame -> [samples, channels] float32 in [-1, 1]."""
    fmt = frame.format.name
    base = fmt[:-1] if frame.format.is_planar else fmt
    channels = len(frame.layout.channels)
    arr = frame.to_ndarray()
    # Planar frames come as [C, S]; packed ones as [1, S * C], interleaved.
    arr = arr.T if frame.format.is_planar else arr.reshape(-1, channels)
    if base in _INT_SCALE:
        offset, scale = _INT_SCALE[base]
        return ((arr.astype(np.float64) - offset) / scale).astype(np.float32)
    return arr.astype(np.float32, copy=False)


def _torchaudio():
    try:
        import torchaudio
    except Exception:  # noqa: BLE001 - a broken torchaudio build must not break decoding
        return None
    return torchaudio


def _decode_torchaudio(src, window: _Window):
    """Last resort where torchaudio imports; None where it does not."""
    ta = _torchaudio()
    if ta is None:
        return None
    wav, rate = ta.load(src)
    samples = wav.T.numpy().astype(np.float32)
    s0, s1 = window.bounds(samples.shape[0], rate, complete=True)
    return samples[s0:s1], rate
