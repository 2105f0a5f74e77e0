"""The GRPO loop end to end on a tiny model: it updates every weight, logs, checkpoints, reloads."""

import json
import textwrap

import pytest
import torch

from lightrft_mm.config import load_config
from lightrft_mm.errors import ConfigError, MediaError
from lightrft_mm.models import load_pretrained
from lightrft_mm.models.tiny import build_tiny
from lightrft_mm.prepare import prepare_synthetic
from lightrft_mm.trainer.loop import train


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    prepare_synthetic("colors", root / "train", n=16, seed=1)
    prepare_synthetic("colors", root / "eval", n=8, seed=2)
    reward = root / "length_reward.py"
    # A reward that varies between completions from the first step (random init never writes
    # a correct answer), loaded by file path like a user's plugin.
    reward.write_text(textwrap.dedent("""
        def length(inputs):
            return [len(x.completion) / 10 for x in inputs]
    """))
    return root


def _cfg(shards, out, *extra):
    return load_config("recipes/demo/colors.yaml", [
        f"data.train=[{shards / 'train'}]", f"data.eval=[{shards / 'eval'}]", f"trainer.output_dir={out}",
        f"rewards=[{{name: '{shards / 'length_reward.py'}:length'}}, exact_match]",
        "trainer.max_steps=3", "data.batch_size=4", "rollout.n=4", "warmup.steps=0",
        "trainer.eval_every=2", "logging.progress=false", *extra])


def test_grpo_updates_every_weight_and_writes_a_reloadable_run(shards, tmp_path):
    out = tmp_path / "run"
    summary = train(_cfg(shards, out))
    initial, _ = build_tiny("qwen2_5_vl", seed=0)
    trained, processor = load_pretrained(out / "checkpoint-final")
    before = dict(initial.named_parameters())
    unchanged = [n for n, p in trained.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged, f"parameters that never changed: {unchanged}"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["reward/length"] > 0 and "loss/clip_fraction" in r and r["grad_norm"] > 0 for r in steps)
    assert "eval/accuracy" in rows[0] and "eval/accuracy" in steps[1] and "eval/accuracy" in rows[-1]
    assert summary["heldout"] == 8 and 0.0 <= summary["after"] <= 1.0
    assert (out / "curves.png").stat().st_size > 1000
    assert (out / "checkpoint-final" / "optimizer.pt").exists()
    traj = [json.loads(line) for line in (out / "trajectories.jsonl").read_text().splitlines()]
    assert len(traj) == 3 * 2 and {"completion", "reward", "advantage"} <= set(traj[0])


def test_kl_to_reference_is_computed_and_changes_the_update(shards, tmp_path):
    train(_cfg(shards, tmp_path / "a", "trainer.max_steps=2"))
    train(_cfg(shards, tmp_path / "b", "trainer.max_steps=2", "algorithm.kl_coef=0.5"))
    rows_b = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    # Step 1 starts at the reference (KL 0); after one update the policy has moved away from it.
    assert rows_b[2]["loss/kl"] > 0
    wa = load_pretrained(tmp_path / "a" / "checkpoint-final")[0].lm_head.weight
    wb = load_pretrained(tmp_path / "b" / "checkpoint-final")[0].lm_head.weight
    assert not torch.equal(wa, wb)


def test_existing_run_is_never_overwritten_silently(shards, tmp_path):
    out = tmp_path / "run"
    train(_cfg(shards, out, "trainer.max_steps=1", "trainer.overwrite=false"))
    with pytest.raises(ConfigError, match="already holds a run"):
        train(_cfg(shards, out, "trainer.max_steps=1", "trainer.overwrite=false"))
    assert (out / "checkpoint-final").exists()


def test_broken_media_is_skipped_and_counted(shards, tmp_path):
    import shutil

    data = tmp_path / "train"
    shutil.copytree(shards / "train", data)
    victim = sorted((data / "media").iterdir())[0]
    victim.write_bytes(b"not a png")
    cfg = load_config("recipes/demo/colors.yaml", [
        f"data.train=[{data}]", "data.eval=[]", f"trainer.output_dir={tmp_path / 'run'}",
        "trainer.max_steps=4", "data.batch_size=8", "rollout.n=2", "warmup.steps=0",
        "logging.progress=false", "logging.plot=false"])
    summary = train(cfg)
    assert summary["skipped_media"] >= 1
    with pytest.raises(MediaError, match="not an image PIL can read"):
        train(load_config("recipes/demo/colors.yaml", [
            f"data.train=[{data}]", "data.eval=[]", f"trainer.output_dir={tmp_path / 'run2'}",
            "trainer.max_steps=4", "data.batch_size=16", "rollout.n=2", "warmup.steps=0",
            "logging.progress=false", "data.on_media_error=fail"]))


def _weights_digest(out):
    import hashlib

    return hashlib.sha256((out / "checkpoint-final" / "model.safetensors").read_bytes()).hexdigest()


FLAGS = ["algorithm.kl_coef=0.5", "algorithm.entropy_coef=0.1", "algorithm.scale_by_std=false",
         "algorithm.epochs=2", "trainer.lr=3e-3", "trainer.adam_beta1=0.5", "trainer.adam_beta2=0.9",
         "trainer.weight_decay=0.5", "trainer.max_grad_norm=0.001", "rollout.temperature=0.5",
         "rollout.top_p=0.3", "rollout.top_k=2", "rollout.max_new_tokens=2", "rollout.n=3",
         "data.batch_size=3", "data.system_prompt='Answer briefly.'", "warmup.steps=1",
         "trainer.seed=7", "model.name_or_path=tiny:llava"]


@pytest.fixture(scope="module")
def baseline(shards, tmp_path_factory):
    """Two identical runs give identical weights, so any difference below comes from the flag."""
    root = tmp_path_factory.mktemp("baseline")
    digests = []
    for name in ("a", "b"):
        train(_cfg(shards, root / name, "trainer.max_steps=2", "data.eval=[]", "logging.plot=false"))
        digests.append(_weights_digest(root / name))
    assert digests[0] == digests[1]
    return digests[0]


@pytest.mark.parametrize("flag", FLAGS)
def test_every_training_flag_changes_the_result(flag, shards, baseline, tmp_path):
    train(_cfg(shards, tmp_path, "trainer.max_steps=2", "data.eval=[]", "logging.plot=false", flag))
    assert _weights_digest(tmp_path) != baseline


def test_clip_acts_on_later_epochs(shards, tmp_path):
    train(_cfg(shards, tmp_path / "a", "trainer.max_steps=2", "algorithm.epochs=3", "algorithm.clip_eps=0.2",
               "trainer.lr=0.05", "data.eval=[]", "logging.plot=false"))
    train(_cfg(shards, tmp_path / "b", "trainer.max_steps=2", "algorithm.epochs=3", "algorithm.clip_eps=0.01",
               "trainer.lr=0.05", "data.eval=[]", "logging.plot=false"))
    rows = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("loss/clip_fraction", 0) for r in rows) > 0
    assert _weights_digest(tmp_path / "a") != _weights_digest(tmp_path / "b")


def test_output_flags(shards, tmp_path):
    summary = train(_cfg(shards, tmp_path, "trainer.max_steps=2", "trainer.save_every=1", "logging.plot=false",
                         "logging.completions=0", "data.eval_max_samples=3", "trainer.eval_every=0"))
    # The last step is saved once, as checkpoint-final.
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-final"]
    assert not (tmp_path / "curves.png").exists() and not (tmp_path / "trajectories.jsonl").exists()
    assert summary["heldout"] == 3
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum("eval/accuracy" in r for r in rows) == 2  # before and after only


def test_cuda_without_a_gpu_is_a_clear_config_error(shards, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match="strategy.device"):
        train(_cfg(shards, tmp_path, "strategy.device=cuda"))
