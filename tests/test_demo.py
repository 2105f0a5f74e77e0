"""`make demo`'s job: tiny GRPO on CPU learns the colour task, and only through the image."""

import re
import shutil

import pytest
from PIL import Image

from lightrft_mm.datasets.loader import load_samples
from lightrft_mm.demo import run_demo
from lightrft_mm.models import load_pretrained
from lightrft_mm.processors.adapter import HFChatAdapter
from lightrft_mm.rewards import REWARDS
from lightrft_mm.rollout.hf import HFRolloutEngine
from lightrft_mm.trainer.evaluate import evaluate


@pytest.mark.slow
def test_demo_learns_from_chance_and_needs_the_image(tmp_path):
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
    model, processor = load_pretrained(summary["checkpoint"])
    adapter = HFChatAdapter(processor)
    fns = [("exact_match", REWARDS.get("exact_match"), 1.0)]
    engine = HFRolloutEngine(model, adapter)
    real = evaluate(engine, adapter, load_samples([data / "heldout"]), fns,
                    accuracy_reward="exact_match", max_new_tokens=8)
    blanked = evaluate(engine, adapter, load_samples([blank]), fns,
                       accuracy_reward="exact_match", max_new_tokens=8)
    assert real["accuracy"] == pytest.approx(summary["after"])
    assert blanked["accuracy"] <= 0.35
