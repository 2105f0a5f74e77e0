"""The video demo: tiny GRPO on CPU learns which way a dot moves, and only from the motion."""

import re
import shutil

import numpy as np
import pytest

from lightrft_mm.datasets.synthetic_video import write_mp4
from lightrft_mm.demo import run_demo
from lightrft_mm.processors.video import load_video


@pytest.mark.slow
def test_video_demo_learns_the_direction_from_motion(tmp_path, checkpoint_accuracy):
    data = tmp_path / "data"
    summary = run_demo("recipes/demo/video.yaml", [
        f"data.train=[{data / 'train'}]", f"data.eval=[{data / 'heldout'}]",
        f"trainer.output_dir={tmp_path / 'run'}", "logging.progress=false"], task="moving_dot")
    assert re.fullmatch(r"demo: accuracy before=\d\.\d\d after=\d\.\d\d heldout=256 time=\d+m\d\ds",
                        summary["line"])
    assert summary["before"] <= 0.35, "the answer-free warm-up must leave accuracy at chance"
    assert summary["after"] >= 0.70, summary["line"]

    # Freeze every held-out video on its first frame: with the motion gone, the trained policy
    # falls back to chance (a single frame shows the dot anywhere, whatever its direction).
    still = tmp_path / "still"
    shutil.copytree(data / "heldout", still)
    for mp4 in (still / "media").glob("*.mp4"):
        first = load_video(mp4, fps=2.0).frames[0]
        write_mp4(mp4, np.stack([first] * 4), fps=2)
    moving, frozen = checkpoint_accuracy(summary["checkpoint"], [data / "heldout", still], max_new_tokens=10)
    assert moving == pytest.approx(summary["after"])
    assert frozen <= 0.40
