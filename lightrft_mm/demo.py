"""`lightrft-mm demo`: prepare the recipe's synthetic data if absent, train, report one line.

The final line reads `demo: accuracy before=<x> after=<y> heldout=<n> time=<m>m<s>s`, where
`before` is the greedy held-out accuracy after the answer-free format warm-up (chance level)
and `after` the accuracy after GRPO.
"""

from __future__ import annotations

import time
from pathlib import Path

from lightrft_mm.config import Config, load_config

# Synthetic splits of the demo: (samples, generator seed). Held-out seeds never meet training.
SPLITS = {"train": (1024, 1), "heldout": (256, 2)}


def ensure_demo_data(cfg: Config, task: str = "colors") -> None:
    """Create data.train[0] / data.eval[0] with the synthetic task when they do not exist yet."""
    from lightrft_mm.prepare import prepare_synthetic

    for paths, split in ((cfg.data.train, "train"), (cfg.data.eval, "heldout")):
        for path in paths:
            if not Path(path).exists():
                n, seed = SPLITS[split]
                prepare_synthetic(task, Path(path), n=n, seed=seed)


def run_demo(config_path: str, overrides: list[str] | None = None, *, task: str = "colors") -> dict:
    """Prepare the synthetic `task` where absent, train, and build the demo's final line.

    Returns:
        The training summary, with the line under "line".
    """
    from lightrft_mm.trainer.loop import train

    started = time.time()
    cfg = load_config(config_path, overrides)
    ensure_demo_data(cfg, task)
    summary = train(cfg)
    minutes, seconds = divmod(int(round(time.time() - started)), 60)
    summary["line"] = (f"demo: accuracy before={summary['before']:.2f} after={summary['after']:.2f} "
                       f"heldout={summary['heldout']} time={minutes}m{seconds:02d}s")
    return summary
