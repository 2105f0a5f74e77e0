"""Synthetic audio tasks generated offline (WAV files written with soundfile).

`higher_tone`: one second of audio holding two pure tones one after the other (each 0.32-0.40 s,
the first in the first half, the second in the second half); the question is whether the
second is higher or lower than the first. The first tone's pitch is drawn over three octaves
(250-2000 Hz) and the second lies 0.5-1 octave above or below it, so neither tone alone gives
the answer: the best guess from the second tone's pitch alone is right 3 times in 4, from the
first tone's alone 1 time in 2. Above 0.75 accuracy, a model compares the tones. Balanced,
deterministic per seed; tiny:qwen2_audio learns it with GRPO in a few CPU minutes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lightrft_mm.schema import Sample

HIGHER_TONE_PROMPT = ("Is the second tone higher or lower than the first? "
                      "Answer with \\boxed{higher} or \\boxed{lower}.")
HIGHER_TONE_CHOICES = ["higher", "lower"]
SAMPLING_RATE = 16000
# Frequencies in Hz: the first tone is drawn log-uniformly in [LOW, HIGH]; the second is an
# interval of INTERVAL octaves away from it.
LOW, HIGH = 250.0, 2000.0
INTERVAL = (0.5, 1.0)


def tone_pair(f1: float, f2: float, rng: np.random.Generator, *, sr: int = SAMPLING_RATE) -> np.ndarray:
    """One second of float32 audio: tone f1, a short gap, tone f2, with jitter and a little noise.

    Args:
        f1, f2: frequencies of the first and the second tone, in Hz.
        rng: draws the timing jitter, loudness, phase and noise.
        sr: sampling rate.
    """
    audio = np.zeros(sr, dtype=np.float64)
    length = int(sr * rng.uniform(0.32, 0.40))
    starts = (int(sr * rng.uniform(0.02, 0.08)), int(sr * rng.uniform(0.52, 0.58)))
    fade = np.minimum(1.0, np.minimum(np.arange(length), np.arange(length)[::-1]) / (0.01 * sr))
    for start, freq in zip(starts, (f1, f2)):
        t = np.arange(length) / sr
        wave = np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi))
        audio[start:start + length] += rng.uniform(0.3, 0.6) * fade * wave
    audio += rng.normal(0, 0.01, size=sr)
    return np.clip(audio, -1.0, 1.0).astype(np.float32)


def higher_tone(n: int, seed: int, media_dir: Path) -> list[Sample]:
    """n balanced samples (answer "higher" or "lower"); WAV files are written to media_dir.

    Args:
        n: number of samples.
        seed: generator seed (same seed, same files and samples).
        media_dir: folder for the WAV files (created); samples refer to them as media/<id>.wav.
    """
    import soundfile as sf

    rng = np.random.default_rng(seed)
    media_dir = Path(media_dir)
    media_dir.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(n):
        answer = HIGHER_TONE_CHOICES[i % 2] if n >= 2 else HIGHER_TONE_CHOICES[rng.integers(2)]
        f1 = float(np.exp(rng.uniform(np.log(LOW), np.log(HIGH))))
        step = rng.uniform(*INTERVAL) * (1 if answer == "higher" else -1)
        f2 = f1 * 2.0 ** step
        sid = f"higher_tone-{seed}-{i}"
        sf.write(media_dir / f"{sid}.wav", tone_pair(f1, f2, rng), SAMPLING_RATE, subtype="PCM_16")
        samples.append(Sample.from_dict({
            "id": sid, "source": "synthetic:higher_tone",
            "messages": [{"role": "user", "content": [
                {"type": "audio", "audio": f"media/{sid}.wav"},
                {"type": "text", "text": HIGHER_TONE_PROMPT}]}],
            "answer": answer, "choices": list(HIGHER_TONE_CHOICES),
            "meta": {"seed": seed, "index": i, "f1": round(f1, 1), "f2": round(f2, 1)}}))
    order = rng.permutation(n)
    return [samples[j] for j in order]


__all__ = ["higher_tone", "tone_pair", "HIGHER_TONE_PROMPT", "HIGHER_TONE_CHOICES"]
