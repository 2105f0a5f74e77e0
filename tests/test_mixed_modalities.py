"""One JSONL mixing image, multi-image, video, audio and text rows trains through `lightrft-mm train`
for every multimodal family; rows a model cannot take are left out, counted, and named in the log."""

import json
import logging
import textwrap

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from lightrft_mm.cli import main
from lightrft_mm.datasets.loader import PromptLoader
from lightrft_mm.datasets.synthetic_video import write_mp4
from lightrft_mm.errors import DataError

KINDS = ("image", "multi_image", "video", "audio", "text")
# family -> the row kinds it takes
TAKES = {
    "qwen2_5_vl": {"image", "multi_image", "video", "text"},
    "llava": {"image", "multi_image", "text"},
    "llava_next": {"image", "multi_image", "text"},
    "qwen2_audio": {"audio", "text"},
    "qwen3_vl": {"image", "multi_image", "video", "text"},
    "qwen3_5": {"image", "multi_image", "video", "text"},
    "qwen2_5_omni": {"image", "multi_image", "video", "audio", "text"},
    "internvl": {"image", "multi_image", "video", "text"},
    "gemma3": {"image", "multi_image", "text"},
}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    media = root / "media"
    media.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(2):
        for side in (48, 64):
            Image.fromarray(rng.integers(0, 256, (side, side + 8 * i, 3), dtype=np.uint8)).save(
                media / f"img{i}_{side}.png")
        write_mp4(media / f"clip{i}.mp4", rng.integers(0, 256, (4, 56, 56, 3), dtype=np.uint8), fps=2)
        t = np.arange(8000 * (1 + i)) / 8000
        sf.write(media / f"tone{i}.wav", 0.3 * np.sin(2 * np.pi * 440 * (i + 1) * t), 8000)
        parts = {
            "image": [{"type": "image", "image": f"media/img{i}_48.png"}],
            "multi_image": [{"type": "image", "image": f"media/img{i}_48.png"},
                            {"type": "image", "image": f"media/img{i}_64.png"}],
            "video": [{"type": "video", "video": f"media/clip{i}.mp4"}],
            "audio": [{"type": "audio", "audio": f"media/tone{i}.wav"}],
            "text": [],
        }
        for kind in KINDS:
            rows.append({"id": f"{kind}-{i}", "source": kind, "answer": "red",
                         "messages": [{"role": "user", "content": parts[kind] + [
                             {"type": "text", "text": f"Describe this {kind} in one word."}]}]})
    data = root / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "length_reward.py").write_text(textwrap.dedent("""
        def length(inputs):
            return [len(x.completion) / 10 for x in inputs]
    """))
    return root


@pytest.mark.parametrize("family", sorted(TAKES))
def test_mixed_jsonl_trains_two_steps(mixed, tmp_path, family, caplog):
    out = tmp_path / "run"
    kept = 2 * len(TAKES[family])
    # Two steps of half the kept rows each: one shuffled epoch, so every kept row is trained on.
    overrides = [
        f"model.name_or_path=tiny:{family}", f"data.train=[{mixed / 'mixed.jsonl'}]",
        f"data.eval=[{mixed / 'mixed.jsonl'}]", f"data.batch_size={kept // 2}", "data.on_media_error=fail",
        f"rewards=[{{name: '{mixed / 'length_reward.py'}:length'}}]", "trainer.accuracy_reward=exact_match",
        "trainer.max_steps=2", "rollout.n=2", "rollout.max_new_tokens=4", "warmup.steps=0",
        f"trainer.output_dir={out}", "logging.progress=false", "logging.plot=false", "logging.completions=100"]
    with caplog.at_level(logging.WARNING, logger="lightrft_mm.datasets.loader"):
        assert main(["train", "recipes/demo/colors.yaml", *overrides]) == 0

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["grad_norm"] > 0 and r["data/skipped_media"] == 0 for r in steps)
    assert steps[-1]["data/unsupported"] == 10 - kept
    trained = {json.loads(line)["id"].rsplit("-", 1)[0] for line in (out / "trajectories.jsonl").open()}
    assert trained == TAKES[family]
    assert json.loads((out / "summary.json").read_text())["heldout"] == kept
    if kept < 10:
        assert "cannot take" in caplog.text and "mixed.jsonl" in caplog.text
    assert (out / "checkpoint-final" / "config.json").exists()


def test_a_folder_with_only_unsupported_media_is_a_clear_error(mixed, tmp_path):
    only_video = tmp_path / "video.jsonl"
    only_video.write_text("".join(line + "\n" for line in (mixed / "mixed.jsonl").read_text().splitlines()
                                  if '"source": "video"' in line))
    with pytest.raises(DataError, match=r"video.jsonl: none of its 2 samples .* \(it takes text, image\)"):
        PromptLoader.from_paths([only_video], batch_size=1, modalities=frozenset({"image"}))
