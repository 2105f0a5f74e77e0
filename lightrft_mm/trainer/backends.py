"""Where a run's metrics go: `metrics.jsonl` always, and the backends of `logging.backends`.

`open_logger` returns one `RunLogger` (rank 0 writes, the other ranks' discards everything) that
fans every metric row out: to `metrics.jsonl` as it is, and to each backend under the same name
at the same step. A row's x axis is its `step`, except for keys of a prefix that brings its own
step key (`warmup/loss` goes on `warmup/step`: the warm-up's rows are `{"step": 0,
"warmup/step": i, "warmup/loss": x}`). Values that are not numbers (strings, None, booleans)
reach only `metrics.jsonl`; NaN / inf go to the backends as they are (every backend here takes
them) and to `metrics.jsonl` as null.

Each backend is one class behind the `Backend` protocol, and its package (an optional extra) is
imported only when it is chosen: TensorBoard event files in `<output_dir>/tensorboard/`, a
local MLflow store in `<output_dir>/mlruns/` (SQLite + artifacts folder), a W&B run in
`<output_dir>/wandb/` (offline unless the user set `WANDB_MODE` or configured an API key).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import netrc
import os
import time
from pathlib import Path
from typing import Protocol

from lightrft_mm.trainer.metrics import open_writer

log = logging.getLogger(__name__)

# backend -> (the modules it imports, the pip command that brings them)
PACKAGES = {"tensorboard": (("tensorboard",), "pip install tensorboard  (or 'lightrft_mm[tensorboard]')"),
            "wandb": (("wandb",), "pip install wandb  (or 'lightrft_mm[wandb]')"),
            "mlflow": (("mlflow", "sqlalchemy", "alembic", "pandas"),  # pandas: MLflow's log_table
                       "pip install mlflow-skinny sqlalchemy alembic pandas  (or 'lightrft_mm[mlflow]')")}
BACKENDS = ("jsonl", *PACKAGES)
ROLLOUT_GROUPS = 4  # prompt groups (every completion of each) sent to the backends per rollouts step


class Backend(Protocol):
    def log(self, row: dict) -> None:
        """One metric row (`step` and its metrics)."""

    def log_rollouts(self, step: int, groups: list[dict]) -> None:
        """Trajectory records (`lightrft_mm.trainer.trajectories`) as images, text and tables."""

    def close(self) -> None: ...


def backend_problems(backends) -> list[str]:
    """Config problems of `logging.backends`: unknown names and backends whose package is missing."""
    problems = []
    for name in backends:
        if name not in BACKENDS:
            problems.append(f"logging.backends: unknown backend {name!r}. Fix: any of {', '.join(BACKENDS)}.")
        elif name in PACKAGES:
            missing = [m for m in PACKAGES[name][0] if importlib.util.find_spec(m) is None]
            if missing:
                problems.append(f"logging.backends: {name} needs the package(s) {', '.join(missing)}, not "
                                f"installed. Fix: {PACKAGES[name][1]}, or remove {name} from logging.backends.")
    return problems


def scalars(row: dict) -> list[tuple[str, float, int]]:
    """The `(name, value, step)` points of a metric row: its numbers (booleans and other values
    left out), each on the row's `step` or on its prefix's own step key (`warmup/step`)."""
    points = []
    for key, value in row.items():
        if key == "step" or key.endswith("/step") or isinstance(value, bool):
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        points.append((key, number, int(row[_axis(key, row)])))
    return points


def _axis(key: str, row: dict) -> str:
    """The key of `row` that is `key`'s x axis: its prefix's own step key, else `step`."""
    own = f"{key.split('/', 1)[0]}/step"
    return own if own in row else "step"


class RunLogger:
    """The one metrics writer of the loop: `metrics.jsonl` plus every backend, rank 0 only."""

    def __init__(self, out: Path, backends: list, enabled: bool = True):
        self._jsonl = open_writer(out / "metrics.jsonl", enabled)
        self.backends = backends if enabled else []

    def write(self, row: dict) -> None:
        self._jsonl.write(row)
        for b in self.backends:
            b.log(row)

    def log_rollouts(self, step: int, groups: list[dict]) -> None:
        for b in self.backends:
            b.log_rollouts(step, groups[:ROLLOUT_GROUPS])

    def close(self) -> None:
        """Close the file and every backend (again: nothing)."""
        self._jsonl.close()
        backends, self.backends = self.backends, []
        for b in backends:
            b.close()


def open_logger(out: Path, logging_cfg, *, enabled: bool = True, config: dict | None = None) -> RunLogger:
    """The run's `RunLogger` (everything discarded when not `enabled`: ranks other than 0).

    Args:
        out: the run folder.
        logging_cfg: the `LoggingConfig` (`backends`).
        config: the whole run config as a dict, recorded by the backends that keep one.
    """
    if not enabled:
        return RunLogger(out, [], enabled=False)
    makers = {"tensorboard": TensorBoardBackend, "wandb": WandbBackend, "mlflow": MlflowBackend}
    backends = [makers[name](out, config or {}) for name in dict.fromkeys(logging_cfg.backends) if name in makers]
    return RunLogger(out, backends)


def _caption(group: dict, completion: dict) -> str:
    rewards = ", ".join(f"{k}={_num(v)}" for k, v in completion["rewards"].items())
    return (f"{group['sample_id']} ({group['source']}), answer {group['answer']!r}\n"
            f"prompt: {group['prompt']}\ncompletion: {completion['text']}\n"
            f"reward {_num(completion['reward'])} ({rewards}), advantage {_num(completion['advantage'])}")


def _num(value) -> str:
    return "-" if value is None else f"{value:.3g}"


def _images(group: dict) -> list[str]:
    return [m["path"] for m in group["media"] if m["type"] == "image" and os.path.isfile(m["path"])]


def _rollout_rows(groups: list[dict]):
    """One row per completion: (group, completion, first image path or None)."""
    for g in groups:
        images = _images(g)
        for c in g["completions"]:
            yield g, c, images[0] if images else None


def _pixels(path: str):
    """An image file as an [H, W, 3] uint8 array."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


class TensorBoardBackend:
    """Event files in `<out>/tensorboard/` (torch's SummaryWriter; needs the tensorboard package)."""

    def __init__(self, out: Path, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        if config:
            import json

            self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```")

    def log(self, row: dict) -> None:
        for name, value, step in scalars(row):
            self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()

    def log_rollouts(self, step: int, groups: list[dict]) -> None:
        for g in groups:
            for k, path in enumerate(_images(g)):
                self.writer.add_image(f"rollouts/group-{g['group']}/image-{k}", _pixels(path), global_step=step,
                                      dataformats="HWC")
            text = "\n\n".join(_caption(g, c).replace("\n", "  \n") for c in g["completions"])
            self.writer.add_text(f"rollouts/group-{g['group']}", text, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def wandb_mode() -> tuple[str | None, bool]:
    """The W&B mode to run in and whether this module chose it: the user's `WANDB_MODE` when
    set; otherwise W&B's own default where an API key is configured, else offline."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"], False
    if os.environ.get("WANDB_API_KEY"):
        return None, False
    try:
        host = os.environ.get("WANDB_BASE_URL", "api.wandb.ai").split("://")[-1]
        if netrc.netrc(os.environ.get("NETRC")).authenticators(host):
            return None, False
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline", True


class WandbBackend:
    """A W&B run in `<out>/wandb/`: offline (no network) unless WANDB_MODE or an API key says otherwise."""

    def __init__(self, out: Path, config: dict):
        import wandb

        self.wandb = wandb
        mode, chosen = wandb_mode()
        if chosen:
            log.info("wandb: no WANDB_MODE and no API key configured: running offline into %s/wandb "
                     "(upload later with `wandb sync`; set WANDB_MODE=online to log online)", out)
        self.run = wandb.init(mode=mode, dir=str(out), project=os.environ.get("WANDB_PROJECT", "lightrft_mm"),
                              name=out.name, config=config,
                              settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))
        self._defined: set[str] = set()

    def log(self, row: dict) -> None:
        values = {}
        for name, value, step in scalars(row):
            axis = _axis(name, row)
            if name not in self._defined:  # each metric on its own x axis: `step`, or its prefix's
                if axis not in self._defined:
                    self.run.define_metric(axis, hidden=True)
                    self._defined.add(axis)
                self.run.define_metric(name, step_metric=axis)
                self._defined.add(name)
            values[name], values[axis] = value, step
        if values:
            self.run.log(values)

    def log_rollouts(self, step: int, groups: list[dict]) -> None:
        wandb = self.wandb
        table = wandb.Table(columns=["step", "group", "sample_id", "source", "image", "prompt", "answer",
                                     "completion", "reward", "rewards", "advantage"])
        for g, c, image in _rollout_rows(groups):
            table.add_data(step, g["group"], g["sample_id"], g["source"], wandb.Image(image) if image else None,
                           g["prompt"], None if g["answer"] is None else str(g["answer"]), c["text"],
                           c["reward"], str(c["rewards"]), c["advantage"])
        self.run.log({"rollouts": table, "step": step})

    def close(self) -> None:
        self.run.finish()


def mlflow_uri(out: Path) -> str:
    """The tracking URI of a run folder's MLflow store (`mlflow ui --backend-store-uri` takes it)."""
    return f"sqlite:///{(Path(out) / 'mlruns' / 'mlflow.db').resolve()}"


class MlflowBackend:
    """A run in the local MLflow store `<out>/mlruns/` (experiment `lightrft_mm`, run named after
    the folder): a SQLite file `mlflow.db` and an `artifacts/` folder, no server.

    Not MLflow's plain-folder file store: it keeps each metric in a file named by its path, so
    `reward/x` and `reward/x/std` cannot both exist there (and MLflow 3 refuses it by default)."""

    def __init__(self, out: Path, config: dict):
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        self._metric = Metric
        (out / "mlruns").mkdir(parents=True, exist_ok=True)
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # table creation, every new store
        logging.getLogger("alembic").setLevel(logging.WARNING)
        self.client = MlflowClient(tracking_uri=mlflow_uri(out))
        experiment = self.client.get_experiment_by_name("lightrft_mm")
        experiment_id = (experiment.experiment_id if experiment is not None else self.client.create_experiment(
            "lightrft_mm", artifact_location=(out / "mlruns" / "artifacts").resolve().as_uri()))
        self.run_id = self.client.create_run(experiment_id, run_name=out.name).info.run_id
        if config:
            self.client.log_dict(self.run_id, config, "config.json")

    def log(self, row: dict) -> None:
        now = int(time.time() * 1000)
        metrics = [self._metric(name, value, now, step) for name, value, step in scalars(row)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_rollouts(self, step: int, groups: list[dict]) -> None:
        rows = {k: [] for k in ("group", "sample_id", "source", "image", "prompt", "answer", "completion", "reward",
                                "rewards", "advantage")}
        for g, c, image in _rollout_rows(groups):
            answer = None if g["answer"] is None else str(g["answer"])
            for k, v in (("group", g["group"]), ("sample_id", g["sample_id"]), ("source", g["source"]),
                         ("image", image), ("prompt", g["prompt"]), ("answer", answer), ("completion", c["text"]),
                         ("reward", _finite(c["reward"])), ("rewards", str(c["rewards"])),
                         ("advantage", _finite(c["advantage"]))):
                rows[k].append(v)
        self.client.log_table(self.run_id, rows, f"rollouts/step-{step:06d}.json")
        for g in groups:
            for k, path in enumerate(_images(g)):
                self.client.log_image(self.run_id, _pixels(path),
                                      f"rollouts/step-{step:06d}/group-{g['group']}-{k}.png")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _finite(value):
    return value if value is None or math.isfinite(value) else None
