"""`lightrft-mm demo`: train on the recipe's synthetic data (generated if absent), report one line.

The final line reads `demo: accuracy before=<x> after=<y> heldout=<n> time=<m>m<s>s`, where
`before` is the greedy held-out accuracy after the answer-free format warm-up (chance level)
and `after` the accuracy after GRPO.
"""

from __future__ import annotations

import time

from lightrft_mm.config import load_config

def run_demo(config_path: str, overrides: list[str] | None = None, *, task: str | None = None) -> dict:
    """Train (the recipe's `data.synthetic` task, or `task`, generated where absent) and build
    the demo's final line.

    Returns:
        The training summary, with the line under "line".
    """
    from lightrft_mm.trainer.loop import train

    started = time.time()
    overrides = list(overrides or [])
    # A demo is run again and again: its run folder is replaced, unless the user resumes it.
    replace = [] if any(o.startswith("trainer.resume=") for o in overrides) else ["trainer.overwrite=true"]
    cfg = load_config(config_path, [*replace, *overrides, *([f"data.synthetic={task}"] if task else [])])
    summary = train(cfg)
    minutes, seconds = divmod(int(round(time.time() - started)), 60)
    summary["line"] = (f"demo: accuracy before={summary['before']:.2f} after={summary['after']:.2f} "
                       f"heldout={summary['heldout']} time={minutes}m{seconds:02d}s")
    return summary
