"""Audio decoding: waveforms match what was written, every bad-input row raises a MediaError."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from lightrft_mm.errors import ConfigError, MediaError
from lightrft_mm.processors.audio import audio_duration, load_audio

av = pytest.importorskip("av")


def sine(seconds: float, rate: int, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum)) * rate / len(x)


def write_av(path, signal: np.ndarray, rate: int, codec: str, *, video: bool = False,
             container: str | None = None) -> None:
    """Encode mono `signal` with PyAV (optionally with a short video track first)."""
    with av.open(str(path), "w", format=container) as out:
        if video:
            vs = out.add_stream("mpeg4", rate=10)
            vs.width, vs.height, vs.pix_fmt = 32, 32, "yuv420p"
        stream = out.add_stream(codec, rate=rate)
        stream.layout = "mono"
        fmt = stream.codec_context.codec.audio_formats[0]
        size = stream.codec_context.frame_size or 1024
        padded = np.concatenate([signal, np.zeros(-len(signal) % size, np.float32)])
        for i in range(0, len(padded), size):
            chunk = padded[i:i + size]
            if fmt.name.startswith("s16"):
                chunk = (chunk * 32767).astype(np.int16)
            elif fmt.name.startswith("s32"):
                chunk = (chunk * 2147483647).astype(np.int32)
            frame = av.AudioFrame.from_ndarray(chunk[None, :], format=fmt.name, layout="mono")
            frame.sample_rate, frame.pts = rate, i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
        if video:
            for k in range(5):
                img = np.full((32, 32, 3), 40 * k, np.uint8)
                for packet in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    out.mux(packet)
            for packet in vs.encode(None):
                out.mux(packet)


def write_video_only(path) -> None:
    with av.open(str(path), "w") as out:
        vs = out.add_stream("mpeg4", rate=10)
        vs.width, vs.height, vs.pix_fmt = 32, 32, "yuv420p"
        for k in range(5):
            img = np.full((32, 32, 3), 40 * k, np.uint8)
            for packet in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in vs.encode(None):
            out.mux(packet)


def encoder(*names: str) -> str:
    for name in names:
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # noqa: BLE001 - absent encoder
            continue
    pytest.skip(f"this FFmpeg build has none of the encoders {names}")


# --- waveforms ------------------------------------------------------------------------------

@pytest.mark.parametrize("subtype, tol", [("PCM_U8", 1 / 100), ("PCM_16", 1e-4), ("PCM_24", 1e-6),
                                          ("FLOAT", 0.0)])
def test_wav_bit_depths_give_the_same_waveform(tmp_path, subtype, tol):
    x = sine(0.5, 8000)
    path = tmp_path / f"{subtype}.wav"
    sf.write(path, x, 8000, subtype=subtype)
    assert sf.info(path).subtype == subtype
    y = load_audio(path, sampling_rate=8000)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert np.abs(y - x).max() <= tol
    assert abs(float(y.mean())) < 0.01  # unsigned 8-bit was re-centred, not offset by +0.5


def test_stereo_44k_resampled_to_16k_mono(tmp_path):
    left, right = sine(1.0, 44100, 440.0, 0.6), sine(1.0, 44100, 440.0, 0.2)
    path = tmp_path / "st.flac"
    sf.write(path, np.stack([left, right], axis=1), 44100)
    y = load_audio(path, sampling_rate=16000)
    assert y.dtype == np.float32 and abs(len(y) - 16000) <= 1
    assert abs(peak_hz(y, 16000) - 440.0) <= 1.0
    ref = sine(1.0, 16000, 440.0, 0.4)  # mean of the two channels
    inner = slice(200, 15800)  # away from the resampler's edge transients
    assert np.abs(y[inner] - ref[inner]).max() < 0.01


def test_six_channels_are_mixed_down(tmp_path):
    base = sine(0.25, 8000)
    chans = np.stack([base * (k + 1) / 10 for k in range(6)], axis=1)  # mean = 0.35 * base
    path = tmp_path / "surround.wav"
    sf.write(path, chans, 8000, subtype="FLOAT")
    y = load_audio(path, sampling_rate=8000)
    assert y.ndim == 1 and np.allclose(y, 0.35 * base, atol=1e-6)


def test_start_end_cut_exact_samples(tmp_path):
    x = sine(2.0, 8000, 123.0)
    path = tmp_path / "a.wav"
    sf.write(path, x, 8000, subtype="FLOAT")
    assert np.array_equal(load_audio(path, sampling_rate=8000, start=0.5, end=1.5), x[4000:12000])
    assert np.array_equal(load_audio(path, sampling_rate=8000, start=1.5), x[12000:])
    assert np.array_equal(load_audio(path, sampling_rate=8000, end=9.0), x)  # end past the file: stop there


def test_bytes_source(tmp_path):
    buf = io.BytesIO()
    x = sine(0.2, 8000)
    sf.write(buf, x, 8000, format="WAV", subtype="FLOAT")
    assert np.array_equal(load_audio(buf.getvalue(), sampling_rate=8000), x)


# --- the duration guard ---------------------------------------------------------------------

def test_too_long_is_clipped_or_refused(tmp_path):
    x = sine(3.0, 8000)
    path = tmp_path / "long.wav"
    sf.write(path, x, 8000, subtype="FLOAT")
    clipped = load_audio(path, sampling_rate=8000, max_seconds=1.0)
    assert np.array_equal(clipped, x[:8000])
    assert np.array_equal(load_audio(path, sampling_rate=8000, start=1.0, max_seconds=1.0), x[8000:16000])
    with pytest.raises(MediaError, match="audio.max_seconds=1.0.*audio.on_too_long=fail") as e:
        load_audio(path, sampling_rate=8000, max_seconds=1.0, on_too_long="fail", where="sample L")
    assert str(path) in str(e.value) and "3.00 s" in str(e.value)
    assert len(load_audio(path, sampling_rate=8000, max_seconds=3.0, on_too_long="fail")) == 24000


def test_too_long_compressed_stops_decoding_early(tmp_path):
    path = tmp_path / "long.mp3"
    write_av(path, sine(3.0, 16000), 16000, encoder("libmp3lame", "mp3"))
    y = load_audio(path, sampling_rate=16000, max_seconds=1.0)
    assert len(y) == 16000
    with pytest.raises(MediaError, match="more than audio.max_seconds=1.0"):
        load_audio(path, sampling_rate=16000, max_seconds=1.0, on_too_long="fail")


# --- compressed formats and containers ------------------------------------------------------

def test_mp3_decode(tmp_path):
    path = tmp_path / "tone.mp3"
    write_av(path, sine(1.0, 22050, 440.0), 22050, encoder("libmp3lame", "mp3"))
    y = load_audio(path, sampling_rate=16000)
    assert abs(len(y) / 16000 - 1.0) < 0.1
    assert abs(peak_hz(y, 16000) - 440.0) <= 2.0
    assert 0.3 < np.abs(y).max() < 0.7
    assert abs(audio_duration(path) - 1.0) < 0.1


@pytest.mark.parametrize("suffix, codec, rate, video", [
    ("mp4", "aac", 44100, True), ("mkv", "flac", 44100, True),
    ("webm", "libopus", 48000, False)])  # webm takes VP8/VP9 video only, absent from some builds
def test_audio_track_of_video_container(tmp_path, suffix, codec, rate, video):
    path = tmp_path / f"clip.{suffix}"
    write_av(path, sine(1.0, rate, 440.0), rate, encoder(codec), video=video)
    y = load_audio(path, sampling_rate=16000)
    assert abs(len(y) / 16000 - 1.0) < 0.1
    assert abs(peak_hz(y, 16000) - 440.0) <= 2.0


def test_pyav_fallback_when_soundfile_cannot_read(tmp_path):
    path = tmp_path / "really_aac.wav"  # wrong extension: soundfile refuses, PyAV decodes
    write_av(path, sine(1.0, 44100, 330.0), 44100, "aac", container="mp4")
    with pytest.raises(sf.LibsndfileError):
        sf.info(path)
    y = load_audio(path, sampling_rate=16000)
    assert abs(peak_hz(y, 16000) - 330.0) <= 2.0


# --- bad input ------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    path = tmp_path / "none.wav"
    with pytest.raises(MediaError, match="does not exist") as e:
        load_audio(path, sampling_rate=16000, where="sample m")
    assert str(path) in str(e.value) and str(e.value).startswith("sample m: ")


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    with pytest.raises(MediaError, match=r"empty \(0 bytes\)"):
        load_audio(path, sampling_rate=16000)


def test_wav_with_zero_samples(tmp_path):
    path = tmp_path / "silent.wav"
    sf.write(path, np.zeros(0, np.float32), 16000)
    assert path.stat().st_size > 0
    with pytest.raises(MediaError, match="contains no samples") as e:
        load_audio(path, sampling_rate=16000)
    assert str(path) in str(e.value)


def test_mp4_without_audio_stream(tmp_path):
    path = tmp_path / "mute.mp4"
    write_video_only(path)
    with pytest.raises(MediaError, match=r"no audio stream \(streams: video\)") as e:
        load_audio(path, sampling_rate=16000)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("name", ["noise.wav", "noise.mp3", "noise.flac"])
def test_undecodable_data(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(0).integers(0, 255, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(MediaError, match="cannot decode audio") as e:
        load_audio(path, sampling_rate=16000)
    assert str(path) in str(e.value) and "pyav" in str(e.value)


def test_bad_start_end(tmp_path):
    path = tmp_path / "a.wav"
    sf.write(path, sine(1.0, 8000), 8000)
    with pytest.raises(MediaError, match="start=0.8 is not before end=0.5") as e:
        load_audio(path, sampling_rate=8000, start=0.8, end=0.5, where="sample c")
    assert str(e.value).startswith(f"sample c: audio {path}: ")
    with pytest.raises(MediaError, match=r"start=2.5 s is at or beyond the end .*1.000 s long"):
        load_audio(path, sampling_rate=8000, start=2.5)
    with pytest.raises(MediaError, match="negative"):
        load_audio(path, sampling_rate=8000, start=-1.0)


def test_bad_arguments_are_config_errors(tmp_path):
    path = tmp_path / "a.wav"
    sf.write(path, sine(0.1, 8000), 8000)
    with pytest.raises(ConfigError, match="audio.on_too_long='drop'"):
        load_audio(path, sampling_rate=8000, on_too_long="drop")
    with pytest.raises(ConfigError, match="audio.max_seconds"):
        load_audio(path, sampling_rate=8000, max_seconds=0)
    with pytest.raises(ConfigError, match="sampling_rate"):
        load_audio(path, sampling_rate=0)
    assert len(load_audio(path, sampling_rate=np.int64(16000))) == 1600  # numpy ints from configs


def test_audio_duration_from_header(tmp_path):
    path = tmp_path / "d.wav"
    sf.write(path, sine(1.25, 8000), 8000)
    assert audio_duration(path) == pytest.approx(1.25)
    with pytest.raises(MediaError, match="does not exist"):
        audio_duration(tmp_path / "x.wav")
