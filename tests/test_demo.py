"""`make demo`'s job: tiny GRPO on CPU learns the colour task, and only through the image."""

import re
import shutil

import pytest
from PIL import Image

from lightrft_mm.demo import run_demo


@pytest.mark.slow
def test_demo_learns_from_chance_and_needs_the_image(tmp_path, checkpoint_accuracy):
    data = tmp_path / "data"
    summary = run_demo("recipes/demo/colors.yaml", [
        f"data.train=[{data / 'train'}]", f"data.eval=[{data / 'heldout'}]",
        f"trainer.output_dir={tmp_path / 'run'}", "logging.progress=false"])
    assert re.fullmatch(r"demo: accuracy before=\d\.\d\d after=\d\.\d\d heldout=256 time=\d+m\d\ds",
                        summary["line"])
    assert summary["before"] <= 0.35, "the answer-free warm-up must leave accuracy at chance"
    assert summary["after"] >= 0.80
    assert (tmp_path / "run" / "curves.png").is_file()

    # Blank every held-out image: the trained policy falls back to chance.
    blank = tmp_path / "blank"
    shutil.copytree(data / "heldout", blank)
    for png in (blank / "media").iterdir():
        Image.new("RGB", (84, 84), (128, 128, 128)).save(png)
    real, blanked = checkpoint_accuracy(summary["checkpoint"], [data / "heldout", blank], max_new_tokens=8)
    assert real == pytest.approx(summary["after"])
    assert blanked <= 0.35


@pytest.mark.slow
def test_demo_learns_in_bf16(tmp_path):
    """strategy.precision=bf16: bf16 compute over fp32 master weights still learns the task."""
    data = tmp_path / "data"
    summary = run_demo("recipes/demo/colors.yaml", [
        f"data.train=[{data / 'train'}]", f"data.eval=[{data / 'heldout'}]", "strategy.precision=bf16",
        f"trainer.output_dir={tmp_path / 'run'}", "logging.progress=false", "logging.plot=false"])
    assert summary["before"] <= 0.35 and summary["after"] >= 0.80, summary["line"]
