"""The audio demo: tiny Qwen2-Audio with GRPO on CPU learns `higher_tone`, by comparing the tones."""

import re
import shutil

import numpy as np
import pytest

from lightrft_mm.demo import run_demo


@pytest.fixture
def one_thread():
    """One intra-op thread: the tiny model's ops are too small to gain from more, and with other
    processes on the cores, spinning OpenMP threads slow the run several-fold."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_audio_demo_learns_from_chance_and_compares_the_tones(tmp_path, one_thread, checkpoint_accuracy):
    import soundfile as sf

    data = tmp_path / "data"
    summary = run_demo("recipes/demo/audio.yaml", [
        f"data.train=[{data / 'train'}]", f"data.eval=[{data / 'heldout'}]",
        f"trainer.output_dir={tmp_path / 'run'}", "logging.progress=false"], task="higher_tone")
    assert re.fullmatch(r"demo: accuracy before=\d\.\d\d after=\d\.\d\d heldout=256 time=\d+m\d\ds",
                        summary["line"])
    assert summary["before"] <= 0.62, "the answer-free warm-up must leave accuracy near chance (0.5)"
    # Above 0.75 the second tone alone does not explain the answers: the model compares.
    assert summary["after"] >= 0.85

    # Swap the two halves of every held-out clip (the tones trade places): most answers flip.
    # A policy that only heard the (new) second tone would stay near 0.5 here.
    swapped = tmp_path / "swapped"
    shutil.copytree(data / "heldout", swapped)
    for wav in (swapped / "media").iterdir():
        audio, rate = sf.read(wav, dtype="float32")
        sf.write(wav, np.concatenate([audio[len(audio) // 2:], audio[:len(audio) // 2]]), rate)
    real, flipped = checkpoint_accuracy(summary["checkpoint"], [data / "heldout", swapped], max_new_tokens=8)
    assert real == pytest.approx(summary["after"])
    assert flipped <= 0.35
