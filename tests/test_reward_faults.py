"""A reward cannot end the run: `sys.exit()` in a reward (in each calling form, with and
without a timeout thread), in a factory or in a plugin's module code is a reward error, while
Ctrl-C still interrupts."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import threading
import time

import pytest

from lightrft_mm.cli import main
from lightrft_mm.config import RewardSpec
from lightrft_mm.errors import RegistryError, RewardError
from lightrft_mm.registry import Registry
from lightrft_mm.rewards import Reward, RewardInput, make_reward, reward_options, run_reward
from lightrft_mm.schema import Sample


def _inputs(n=2):
    sample = Sample.from_dict({"id": "s", "source": "d", "messages": [{"role": "user", "content": "q"}]})
    return [RewardInput(c, (1,), sample, 0) for c in "abcd"[:n]]


def batched_exit(inputs):
    sys.exit(3)


def each_exit(x):
    if x.completion == "b":
        sys.exit(3)
    return 1.0


async def async_batched_exit(inputs):
    await asyncio.sleep(0)
    sys.exit(3)


async def async_each_exit(x):
    await asyncio.sleep(0)
    if x.completion == "b":
        sys.exit(3)
    return 1.0


@pytest.mark.parametrize("timeout", [0.0, 5.0], ids=["in-caller", "in-timeout-thread"])
@pytest.mark.parametrize("fn, batched, status", [
    (batched_exit, True, ["error", "error"]), (each_exit, False, ["ok", "error"]),
    (async_batched_exit, True, ["error", "error"]), (async_each_exit, False, ["ok", "error"]),
], ids=["batched", "per-sample", "async-batched", "async-per-sample"])
def test_sys_exit_in_a_reward_is_that_rewards_error(fn, batched, status, timeout, caplog):
    reward = Reward("quitter", fn, batched=batched, timeout=timeout, where="rewards[0]")
    with caplog.at_level(logging.ERROR, logger="lightrft_mm.rewards"):
        out = run_reward(reward, _inputs())
    assert out.status == status
    assert out.values == [None if s == "error" else 1.0 for s in status]
    message = caplog.records[0].getMessage()
    assert "reward 'quitter' (rewards[0]) failed" in message and "SystemExit: 3" in message
    assert "sys.exit()" in message and "reward/quitter/errors" in message
    with pytest.raises(RewardError, match=r"(?s)'quitter'.*SystemExit: 3.*fail_fast") as info:
        run_reward(Reward("quitter", fn, batched=batched, timeout=timeout), _inputs(), fail_fast=True)
    assert isinstance(info.value.__cause__, SystemExit)


def test_ctrl_c_still_interrupts_while_a_reward_runs():
    def interrupted(inputs):
        raise KeyboardInterrupt

    for timeout in (0.0, 5.0):  # raised by the reward: passed on, in the caller's thread too
        with pytest.raises(KeyboardInterrupt):
            run_reward(Reward("ctrl_c", interrupted, timeout=timeout), _inputs())
    release = threading.Event()

    def hangs(inputs):
        release.wait(10)
        return [1.0] * len(inputs)

    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))  # the user's Ctrl-C
    started = time.perf_counter()
    try:
        with pytest.raises(KeyboardInterrupt):
            timer.start()
            run_reward(Reward("hangs", hangs, timeout=5.0), _inputs())
    finally:
        release.set()
        timer.cancel()
    assert time.perf_counter() - started < 3
    # sys.exit() is still a reward error after that (the test above is the fault; this the contrast)
    assert run_reward(Reward("quitter", batched_exit), _inputs()).status == ["error", "error"]


def test_a_factory_that_calls_sys_exit_is_a_reward_error():
    def factory(level: int = 1):
        sys.exit(level)

    registry_name = "faults_exiting_factory"
    from lightrft_mm.rewards import REWARDS

    REWARDS.register(registry_name, obj=reward_options(factory, factory=True))
    try:
        with pytest.raises(RewardError, match=r"rewards\[0\]: building reward 'faults_exiting_factory'.*SystemExit: 4"):
            make_reward(RewardSpec(name=registry_name, args={"level": 4}), where="rewards[0]")
    finally:
        REWARDS._origins.pop(registry_name, None)
        REWARDS._objects.pop(registry_name, None)


def test_plugin_module_code_that_calls_sys_exit_is_a_registry_error(tmp_path, monkeypatch):
    plugin = tmp_path / "exits_on_import.py"
    plugin.write_text("import sys\nsys.exit(2)\n")
    with pytest.raises(RegistryError, match=r"exits_on_import\.py.*failed to import: SystemExit: 2"):
        Registry("reward").get(f"{plugin}:fn")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RegistryError, match=r"'exits_on_import:fn' failed to import: SystemExit: 2"):
        Registry("reward").get("exits_on_import:fn")
    sys.modules.pop("exits_on_import", None)


def test_rewards_score_reports_a_reward_that_calls_sys_exit(tmp_path, capsys):
    plugin = tmp_path / "quits.py"
    plugin.write_text("import sys\n\ndef quits(inputs):\n    sys.exit(3)\n")
    data = tmp_path / "completions.jsonl"
    rows = [{"id": f"q{i}", "source": "d", "messages": [{"role": "user", "content": "q"}], "completion": c}
            for i, c in enumerate(["yes", "no"])]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["rewards", "score", "--reward", f"{plugin}:quits", "--reward", "exact_match",
                 "--data", str(data)]) == 0  # before: the process ended with status 3 and no output
    out = capsys.readouterr().out
    assert "quits" in out and "error" in out
