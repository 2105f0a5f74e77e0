"""Runs that survive: exact resume after SIGKILL (single and fsdp2), damaged checkpoints, one run
per folder, non-finite guards, disk-full saves."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from lightrft_mm.config import load_config
from lightrft_mm.errors import CheckpointError, ConfigError, TrainingError
from lightrft_mm.prepare import prepare_synthetic
from lightrft_mm.trainer.checkpoint import MANIFEST, save_hf
from lightrft_mm.trainer.lock import RunLock
from lightrft_mm.trainer.loop import train
from lightrft_mm.trainer.metrics import JsonlWriter


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    prepare_synthetic("colors", root / "train", n=32, seed=1)
    prepare_synthetic("colors", root / "eval", n=8, seed=2)
    (root / "length_reward.py").write_text(textwrap.dedent("""
        def length(inputs):
            return [len(x.completion) / 10 for x in inputs]
    """))
    return root


def _overrides(shards, out, *extra) -> list[str]:
    # Everything a checkpoint must carry is in play: running reward statistics, the adaptive KL
    # controller with its reference, sampling RNG, the data position past one epoch, evals.
    return [f"data.train=[{shards / 'train'}]", f"data.eval=[{shards / 'eval'}]", f"trainer.output_dir={out}",
            f"rewards=[{{name: '{shards / 'length_reward.py'}:length'}}, exact_match]",
            "trainer.max_steps=10", "trainer.save_every=2", "data.batch_size=4", "rollout.n=4",
            "rollout.max_new_tokens=6", "warmup.steps=2", "warmup.batch_size=4", "trainer.eval_every=3",
            "algorithm.reward_norm=running", "algorithm.kl_coef=0.05", "algorithm.kl_target=0.01",
            "logging.progress=false", "logging.plot=false", *extra]


def _rows(out) -> dict[int, dict]:
    """metrics.jsonl by step, without wall-clock timings (the last row of a step wins)."""
    rows = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["step"], {}).update(
            {k: v for k, v in row.items() if not (k.startswith("time/") or k.endswith("/time"))})
    return rows


def _kill_after_checkpoint(cmd: list[str], out, step: int, timeout: float = 300) -> None:
    """Start `cmd`, SIGKILL its whole process group once checkpoint-<step> is complete."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, env=ENV)
    deadline = time.time() + timeout
    while not (out / f"checkpoint-{step}" / MANIFEST).exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before checkpoint-{step}: {proc.stderr.read()[-3000:]}")
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"no checkpoint-{step} after {timeout} s")
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "checkpoint-final").exists(), "the run finished before it was killed"


def _assert_same_after(killed: dict, full: dict, step: int) -> None:
    later = [s for s in full if s > step]
    assert later and all(s in killed for s in later)
    for s in later:
        assert killed[s] == full[s], f"step {s}: " + str({k: (killed[s].get(k), v) for k, v in full[s].items()
                                                           if killed[s].get(k) != v})


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # every run alike: the same reduction order, the same bits


def test_sigkill_then_resume_gives_the_uninterrupted_metrics(shards, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"

    def cmd(out, *extra):
        return [sys.executable, "-m", "lightrft_mm", "train", "recipes/demo/colors.yaml",
                *_overrides(shards, out, *extra)]

    proc = subprocess.run(cmd(full), capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _kill_after_checkpoint(cmd(killed), killed, 4)
    with pytest.raises(ConfigError, match="already holds a run.*trainer.resume=auto"):
        train(load_config("recipes/demo/colors.yaml", _overrides(shards, killed)))
    proc = subprocess.run(cmd(killed, "trainer.resume=auto"), capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_after(_rows(killed), _rows(full), 4)
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["before"] == json.loads((full / "summary.json").read_text())["before"]
    # The exported weights are the same too.
    a = (full / "checkpoint-final" / "model.safetensors").read_bytes()
    assert a == (killed / "checkpoint-final" / "model.safetensors").read_bytes()


@pytest.mark.distributed
def test_fsdp2_sigkill_then_resume_gives_the_uninterrupted_metrics(shards, tmp_path):
    from tests.test_distributed import free_port

    def cmd(out, *extra):
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-addr",
                "127.0.0.1", "--master-port", str(free_port()), "-m", "lightrft_mm", "train",
                "recipes/demo/colors.yaml", *_overrides(shards, out, "strategy.name=fsdp2", "trainer.max_steps=6",
                                                        *extra)]

    full, killed = tmp_path / "full", tmp_path / "killed"
    proc = subprocess.run(cmd(full), capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _kill_after_checkpoint(cmd(killed), killed, 2)
    proc = subprocess.run(cmd(killed, "trainer.resume=auto"), capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_after(_rows(killed), _rows(full), 2)


def _quick(shards, out, *extra):
    return load_config("recipes/demo/colors.yaml", [
        f"data.train=[{shards / 'train'}]", "data.eval=[]", f"trainer.output_dir={out}", "trainer.max_steps=4",
        "data.batch_size=4", "rollout.n=2", "rollout.max_new_tokens=4", "warmup.steps=0",
        "logging.progress=false", "logging.plot=false", *extra])


def test_damaged_checkpoint_is_refused_naming_the_previous_good_one(shards, tmp_path):
    out = tmp_path / "run"
    train(_quick(shards, out, "trainer.save_every=1", "trainer.keep_checkpoints=2"))
    # The last step is saved once, as checkpoint-final.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3", "checkpoint-final"]
    victim = out / "checkpoint-final" / "optimizer.pt"
    victim.write_bytes(victim.read_bytes()[:100])  # a copy cut short
    with pytest.raises(CheckpointError, match=r"damaged checkpoint: optimizer.pt is 100 bytes.*checkpoint-3"):
        train(_quick(shards, out, "trainer.max_steps=6", "trainer.resume=auto"))
    # The named one resumes; the rows after it are trained again, none twice.
    train(_quick(shards, out, "trainer.max_steps=6", f"trainer.resume={out / 'checkpoint-3'}"))
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4, 5, 6, 6]


def test_resume_auto_without_a_checkpoint_starts_fresh(shards, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1}\n')  # a run that died before its first save
    train(_quick(shards, out, "trainer.max_steps=2", "trainer.resume=auto"))
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 2]


def test_a_second_run_into_a_held_folder_stops_at_once_naming_the_holder(shards, tmp_path):
    out = tmp_path / "run"
    holder = RunLock(out).acquire()
    try:
        started = time.time()
        with pytest.raises(ConfigError, match=rf"in use by another run \(pid {os.getpid()} on .*, started"):
            train(_quick(shards, out))
        assert time.time() - started < 5 and not (out / "config.json").exists()
    finally:
        holder.release()
    # A lock left by a dead process is stale: the next run takes it over.
    (out / ".lock").write_text(json.dumps({"pid": 999999, "host": "gone", "started": "long ago"}))
    train(_quick(shards, out, "trainer.max_steps=1"))
    assert (out / "checkpoint-final").exists()


def test_lock_is_exclusive_between_processes(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from lightrft_mm.trainer.lock import RunLock
        RunLock({str(tmp_path)!r}).acquire(); print("held", flush=True); time.sleep(60)""")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=f"pid {holder.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    RunLock(tmp_path).acquire().release()  # the kernel released the dead holder's lock


def test_diverging_run_skips_non_finite_steps_and_stops(shards, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"non-finite gradient norm.*2 steps in a row.*trainer.lr \(now 1e\+08\)"):
        train(_quick(shards, out, "trainer.lr=1e8", "trainer.max_steps=20", "trainer.max_bad_steps=2",
                     f"rewards=[{{name: '{shards / 'length_reward.py'}:length'}}]",
                     "trainer.max_grad_norm=0", "trainer.save_every=1"))

    def strict(text):  # the JSON standard: no bare NaN / Infinity
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))

    rows = [strict(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train/skipped_steps"] >= 2
    # Every checkpoint written holds finite weights (a step whose norm is NaN is never applied).
    from safetensors.torch import load_file

    for ckpt in out.glob("checkpoint-*"):
        assert all(bool(torch.isfinite(t).all()) for t in load_file(ckpt / "model.safetensors").values())


def test_non_finite_weights_are_never_saved(tmp_path):
    from lightrft_mm.models.tiny import build_tiny

    model, processor = build_tiny("qwen2", seed=0)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="lm_head.weight is not finite"):
        save_hf(model, processor, tmp_path / "ckpt")
    assert not any(tmp_path.iterdir())


def test_metrics_stay_strict_json(tmp_path):
    w = JsonlWriter(tmp_path / "m.jsonl")
    w.write({"step": 1, "loss": float("nan"), "norm": torch.tensor(float("inf")), "ok": 0.5, "n": 3})
    w.close()
    assert json.loads((tmp_path / "m.jsonl").read_text()) == {"step": 1, "loss": None, "norm": None, "ok": 0.5,
                                                             "n": 3}


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_on_the_final_save_keeps_the_weights(shards, tmp_path, monkeypatch):
    from lightrft_mm.strategy.single import SingleStrategy

    out = tmp_path / "run"
    monkeypatch.setattr(SingleStrategy, "save", _disk_full)
    with pytest.raises(CheckpointError, match=r"checkpoint-final failed: .*No space left.*disk is full.*weights "
                                              r"were saved"):
        train(_quick(shards, out))
    final = out / "checkpoint-final"
    manifest = json.loads((final / MANIFEST).read_text())
    assert manifest["resumable"] is False and "model.safetensors" in manifest["files"]
    assert not (final / "optimizer.pt").exists() and not list(out.glob(".checkpoint-*"))
    from lightrft_mm.models import load_pretrained

    load_pretrained(final)  # the trained model is there, loadable
    summary = json.loads((out / "summary.json").read_text())
    assert "disk is full" in summary["checkpoint_error"]


def test_disk_full_on_a_periodic_save_leaves_the_previous_checkpoint(shards, tmp_path, monkeypatch):
    from lightrft_mm.strategy.single import SingleStrategy

    out = tmp_path / "run"
    real, calls = SingleStrategy.save, []

    def full_on_second(self, path):
        calls.append(path)
        if len(calls) == 2:
            _disk_full()
        real(self, path)

    monkeypatch.setattr(SingleStrategy, "save", full_on_second)
    with pytest.raises(CheckpointError, match=r"checkpoint-4 failed.*disk is full"):
        train(_quick(shards, out, "trainer.save_every=2", "trainer.max_steps=6"))
    assert sorted(p.name for p in out.iterdir() if p.name.startswith((".checkpoint", "checkpoint"))) == \
        ["checkpoint-2"]
    from lightrft_mm.trainer.checkpoint import verify

    assert verify(out / "checkpoint-2")["step"] == 2


def test_validate_refuses_resume_with_overwrite():
    with pytest.raises(ConfigError, match="trainer.resume: set together with trainer.overwrite"):
        load_config("recipes/demo/colors.yaml", ["trainer.resume=auto", "trainer.overwrite=true"])
    with pytest.raises(ConfigError, match="is not a checkpoint folder"):
        load_config("recipes/demo/colors.yaml", ["trainer.resume=/nonexistent/checkpoint-3"])
