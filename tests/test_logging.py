"""Logging backends: every metric of metrics.jsonl reaches TensorBoard, W&B (offline) and MLflow
under the same name and step, warm-up losses on their own axis, rollouts as images / tables;
`validate` refuses a backend whose package is missing."""

import glob
import importlib.util
import json
import math
import struct

import pytest

from lightrft_mm.config import load_config
from lightrft_mm.errors import ConfigError
from lightrft_mm.prepare import prepare_synthetic
from lightrft_mm.trainer.backends import RunLogger, mlflow_uri, scalars, wandb_mode
from lightrft_mm.trainer.loop import train

BACKENDS = ("tensorboard", "wandb", "mlflow")


def _cfg(root, out, *extra):
    return load_config("recipes/demo/colors.yaml", [
        f"data.train=[{root / 'train'}]", "data.eval=[]", f"trainer.output_dir={out}",
        "trainer.max_steps=2", "data.batch_size=4", "rollout.n=2", "rollout.max_new_tokens=4",
        "warmup.steps=2", "warmup.batch_size=4", "trainer.eval_every=0", "trainer.save_every=0",
        "trainer.keep_checkpoints=0", "logging.progress=false", "logging.plot=false", *extra])


@pytest.fixture(scope="module")
def run(tmp_path_factory, monkeypatch_module):
    """One 2-step run (after a 2-step warm-up) into every backend; (run folder, metrics rows)."""
    for name in BACKENDS:
        pytest.importorskip(name)
    monkeypatch_module.delenv("WANDB_MODE", raising=False)
    monkeypatch_module.delenv("WANDB_API_KEY", raising=False)
    monkeypatch_module.setenv("NETRC", str(tmp_path_factory.mktemp("home") / "netrc"))  # no key configured
    root = tmp_path_factory.mktemp("data")
    prepare_synthetic("colors", root / "train", n=8, seed=1)
    out = root / "run"
    train(_cfg(root, out, "logging.backends=[jsonl, tensorboard, wandb, mlflow]", "logging.trajectories_every=0",
               "logging.rollouts_every=2"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, rows


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _series(rows, name):
    """(step, value) of `name` in metrics.jsonl, on its own axis (warmup/step for warmup/*)."""
    return [(p[2], p[1]) for r in rows for p in scalars(r) if p[0] == name]


def _same(got, want):
    """The same (step, value) points; values to float32 precision (TensorBoard keeps float32)."""
    assert [s for s, _ in got] == [s for s, _ in want]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)


def test_scalars_take_numbers_on_their_axis():
    row = {"step": 3, "a/b": 1, "loss": float("nan"), "final": True, "name": "x", "none": None,
           "warmup/step": 7, "warmup/loss": 2.5}
    got = scalars(row)
    assert [(k, s) for k, _, s in got] == [("a/b", 3), ("loss", 3), ("warmup/loss", 7)]
    assert math.isnan(got[1][1])


def test_discarding_logger_writes_nothing(tmp_path):
    logger = RunLogger(tmp_path, [], enabled=False)
    logger.write({"step": 1, "x": 1.0})
    logger.close()
    assert not (tmp_path / "metrics.jsonl").exists()


def test_tensorboard_event_files_hold_every_metric(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, rows = run
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    names = {p[0] for r in rows for p in scalars(r)}
    assert names <= set(acc.Tags()["scalars"]), names - set(acc.Tags()["scalars"])
    for name in ("reward/mean", "loss/pg_loss", "grad_norm", "warmup/loss", "completion/length"):
        _same([(e.step, e.value) for e in acc.Scalars(name)], _series(rows, name))
    assert [e.step for e in acc.Scalars("warmup/loss")] == [1, 2]
    images = [t for t in acc.Tags()["images"] if t.startswith("rollouts/")]
    assert images and all(e.step == 2 for t in images for e in acc.Images(t))
    assert any(t.startswith("rollouts/") for t in acc.Tags()["tensors"])  # add_text


def _wandb_history(path):
    """The history rows of an offline run's .wandb file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert struct.unpack("<4sHB", data[:7])[0] == b":W&B"
    pos, part, rows = 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (kind == 0 and length == 0):
            pos += left
            continue
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(part)
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
            part = b""
    return rows


def test_wandb_offline_run_holds_every_metric(run):
    out, rows = run
    files = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    history = _wandb_history(files[0])
    for name in ("reward/mean", "loss/pg_loss", "grad_norm", "completion/length"):
        got = [(h["step"], h[name]) for h in history if name in h]
        _same([(s, float("nan") if v == "NaN" else v) for s, v in got], _series(rows, name))
    _same([(h["warmup/step"], h["warmup/loss"]) for h in history if "warmup/loss" in h], _series(rows, "warmup/loss"))
    tables = [h for h in history if h.get("rollouts/_type") == "table-file"]  # a logged wandb.Table
    assert len(tables) == 1 and tables[0]["step"] == 2 and tables[0]["rollouts/nrows"] == 4 * 2  # 4 groups x n


def test_wandb_is_offline_without_a_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert wandb_mode() == ("offline", True)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == ("disabled", False)
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode() == (None, False)  # W&B's own default (online) for a user who configured a key
    monkeypatch.delenv("WANDB_API_KEY")
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert wandb_mode() == (None, False)  # `wandb login` wrote the key to the netrc file


def test_mlflow_store_holds_every_metric(run):
    from mlflow.tracking import MlflowClient

    out, rows = run
    client = MlflowClient(tracking_uri=mlflow_uri(out))
    (mlrun,) = client.search_runs([client.get_experiment_by_name("lightrft_mm").experiment_id])
    names = {p[0] for r in rows for p in scalars(r)}
    assert names <= set(mlrun.data.metrics), names - set(mlrun.data.metrics)
    for name in ("reward/mean", "reward/exact_match", "reward/exact_match/std", "loss/pg_loss", "warmup/loss"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(mlrun.info.run_id, name))
        _same(history, _series(rows, name))
    artifacts = [a.path for a in client.list_artifacts(mlrun.info.run_id, "rollouts")]
    assert "rollouts/step-000002.json" in artifacts and "rollouts/step-000002" in artifacts
    assert mlrun.info.status == "FINISHED"


@pytest.mark.parametrize("backend", BACKENDS)
def test_validate_refuses_a_backend_without_its_package(backend, monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == backend else real(name, *a))
    with pytest.raises(ConfigError, match=rf"logging.backends: {backend} needs .*Fix: pip install"):
        _cfg(tmp_path, tmp_path / "run", f"logging.backends=[jsonl, {backend}]")


def test_validate_refuses_an_unknown_backend(tmp_path):
    with pytest.raises(ConfigError, match="unknown backend 'tensorbord'"):
        _cfg(tmp_path, tmp_path / "run", "logging.backends=[tensorbord]")


def test_no_trajectory_files_with_trajectories_every_0(run):
    out, _ = run
    assert not (out / "trajectories").exists()
