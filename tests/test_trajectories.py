"""Trajectory files: every `logging.trajectories_every` steps one JSON line per prompt group, in
exactly the schema `lightrft-mm view` reads (lightrft_mm/trainer/trajectories.py)."""

import json
import math
import os

import pytest

from lightrft_mm.config import load_config
from lightrft_mm.prepare import prepare_synthetic
from lightrft_mm.schema import Sample
from lightrft_mm.trainer.loop import train
from lightrft_mm.trainer.trajectories import media, prompt_text

GROUP_KEYS = {"step": int, "group": int, "sample_id": str, "source": str, "prompt": str, "media": list,
              "answer": (str, type(None)), "completions": list}
COMPLETION_KEYS = {"text": str, "tokens": list, "logps": list, "entropy": list, "reward": (float, type(None)),
                   "rewards": dict, "advantage": float}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    prepare_synthetic("colors", root / "train", n=8, seed=1)
    out = root / "run"
    cfg = load_config("recipes/demo/colors.yaml", [
        f"data.train=[{root / 'train'}]", "data.eval=[]", f"trainer.output_dir={out}",
        "trainer.max_steps=3", "data.batch_size=4", "rollout.n=3", "rollout.max_new_tokens=6", "warmup.steps=0",
        "trainer.eval_every=0", "trainer.save_every=0", "trainer.keep_checkpoints=0", "logging.progress=false",
        "logging.plot=false", "logging.trajectories_every=2"])
    train(cfg)
    return out, cfg


def test_every_k_steps_one_file(run):
    out, _ = run
    assert sorted(p.name for p in (out / "trajectories").iterdir()) == ["step-000002.jsonl"]


def test_records_follow_the_schema_exactly(run):
    out, cfg = run
    groups = [json.loads(line) for line in (out / "trajectories" / "step-000002.jsonl").read_text().splitlines()]
    assert [g["group"] for g in groups] == [0, 1, 2, 3]  # data.batch_size prompts
    names = [r.name for r in cfg.rewards]
    for g in groups:
        assert set(g) == set(GROUP_KEYS)
        assert all(isinstance(g[k], t) for k, t in GROUP_KEYS.items()), g
        assert g["step"] == 2 and g["source"] == "synthetic:colors" and g["answer"]
        assert g["prompt"] and "<|image_pad|>" not in g["prompt"] and "<image>" not in g["prompt"]
        assert g["media"] and all(set(m) == {"type", "path"} and m["type"] == "image" for m in g["media"])
        assert all(os.path.isabs(m["path"]) and os.path.isfile(m["path"]) for m in g["media"])
        assert len(g["completions"]) == cfg.rollout.n
        for c in g["completions"]:
            assert set(c) == set(COMPLETION_KEYS)
            assert all(isinstance(c[k], t) for k, t in COMPLETION_KEYS.items()), c
            n_tokens = len(c["tokens"])
            assert 0 < n_tokens <= cfg.rollout.max_new_tokens
            assert len(c["logps"]) == len(c["entropy"]) == n_tokens
            assert all(isinstance(t, str) for t in c["tokens"])
            assert all(isinstance(x, float) and x <= 0 for x in c["logps"])
            assert all(isinstance(x, float) and 0 < x < 10 for x in c["entropy"])  # < log(vocab), not constant 0
            assert list(c["rewards"]) == names
            weighted = sum(r.weight * c["rewards"][r.name] for r in cfg.rewards)
            assert c["reward"] == pytest.approx(weighted)  # the combined reward (sum_then_normalize)
        # GRPO advantages are centred within the group
        assert abs(sum(c["advantage"] for c in g["completions"])) < 1e-4
        assert not any(math.isnan(c["advantage"]) for c in g["completions"])


def test_prompt_text_and_media_paths(tmp_path):
    sample = Sample.from_dict({"id": "s", "messages": [
        {"role": "system", "content": [{"type": "text", "text": "be brief"}]},
        {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "video", "video": "/v/b.mp4"},
                                     {"type": "text", "text": "<image>Find x. <|vision_start|><|image_pad|>"},
                                     {"type": "audio", "audio": "https://x/c.wav"}]}]})
    assert prompt_text(sample) == "Find x."
    assert media(sample) == [{"type": "image", "path": os.path.abspath("a.png")},
                             {"type": "video", "path": "/v/b.mp4"}, {"type": "audio", "path": "https://x/c.wav"}]


def test_dynamic_sampling_keeps_each_rewards_values(tmp_path):
    """DAPO's dynamic sampling joins the informative groups of several rollout batches; the
    per-reward values of the kept completions must follow them into the records."""
    root = tmp_path / "data"
    prepare_synthetic("colors", root / "train", n=8, seed=1)
    (root / "length.py").write_text("def length(inputs):\n    return [len(x.completion) / 10 for x in inputs]\n")
    out = tmp_path / "run"
    train(load_config("recipes/demo/colors.yaml", [
        f"data.train=[{root / 'train'}]", "data.eval=[]", f"trainer.output_dir={out}", "trainer.max_steps=1",
        "data.batch_size=4", "rollout.n=3", "rollout.max_new_tokens=6", "warmup.steps=0", "algorithm.name=dapo",
        f"rewards=[{{name: '{root / 'length.py'}:length'}}, exact_match]", "trainer.save_every=0",
        "trainer.keep_checkpoints=0", "logging.progress=false", "logging.plot=false", "logging.trajectories_every=1"]))
    groups = [json.loads(x) for x in (out / "trajectories" / "step-000001.jsonl").read_text().splitlines()]
    completions = [c for g in groups for c in g["completions"]]
    assert completions and all(c["rewards"]["length"] == pytest.approx(len(c["text"]) / 10)
                               for c in completions)
