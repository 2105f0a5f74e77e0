"""Registration (four ways), calling conventions, routing, combination, metrics and fault
isolation of rewards, and their config fields."""

from __future__ import annotations

import asyncio
import logging
import sys
import textwrap
import threading
import time
import uuid

import pytest

from lightrft_mm.config import build_config, load_config
from lightrft_mm.errors import ConfigError, RegistryError, RewardError
from lightrft_mm.rewards import (REWARDS, Reward, RewardInput, RewardSet, build_reward_set, check_routing, combine,
                                 register_reward, reward_options, run_reward, score, score_rewards)
from lightrft_mm.schema import Sample


def make_sample(sid="s", source="default", answer="red", user="What colour?"):
    return Sample.from_dict({"id": sid, "source": source, "answer": answer,
                             "messages": [{"role": "user", "content": user}]})


def inp(completion, sample=None, group=0):
    return RewardInput(completion, (1, 2), sample or make_sample(), group)


def length(inputs):
    return [float(len(x.completion)) for x in inputs]


def spec(name, **kw):
    """A RewardSpec, not validated (a config would refuse the broken ones before building)."""
    from lightrft_mm.config import RewardSpec

    return RewardSpec(name=name, **kw)


@pytest.fixture
def fresh_name():
    """A unique reward name, unregistered after the test."""
    name = f"t_{uuid.uuid4().hex[:8]}"
    yield name
    REWARDS._origins.pop(name, None)
    REWARDS._objects.pop(name, None)


# --- registration: decorator, module:attr, file.py:fn, entry point -------------------------------

def test_decorator_registers_a_per_sample_reward(fresh_name):
    calls = []

    @register_reward(fresh_name, batched=False)
    def one(x: RewardInput) -> float:
        calls.append(x.completion)
        return float(x.completion == "yes")

    rs = build_reward_set(load_config(None, [f"rewards=[{fresh_name.upper()}]"]).rewards)
    assert rs.rewards[0].fn is one and rs.rewards[0].batched is False
    assert combine(rs, [inp("yes"), inp("no")])[0] == [1.0, 0.0]
    assert calls == ["yes", "no"]  # once per input
    assert REWARDS.origin(fresh_name) == f"{__name__}:test_decorator_registers_a_per_sample_reward.<locals>.one"


def test_bare_decorator_and_factory(fresh_name):
    @register_reward(fresh_name, factory=True)
    def scaled(scale: float = 1.0):
        return lambda inputs: [scale * len(x.completion) for x in inputs]

    rs = build_reward_set([spec(fresh_name, args={"scale": 0.5})])
    assert combine(rs, [inp("abcd")])[0] == [2.0]
    assert combine(build_reward_set([spec(fresh_name)]), [inp("abcd")])[0] == [4.0]  # default args


def test_module_attr_spec(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "lrmm_user_rewards.py").write_text(
        "def brevity(inputs):\n    return [-len(x.completion) for x in inputs]\n")
    try:
        rs = build_reward_set(load_config(None, ["rewards=[{name: 'lrmm_user_rewards:brevity'}]"]).rewards)
        assert rs.names() == ["brevity"]
        assert combine(rs, [inp("abc")])[0] == [-3.0]
    finally:
        sys.modules.pop("lrmm_user_rewards", None)


def test_file_spec_and_its_errors(tmp_path):
    plugin = tmp_path / "my_rewards.py"
    plugin.write_text(textwrap.dedent("""
        from lightrft_mm.rewards import reward_options

        @reward_options(batched=False)
        def shouty(x):
            return float(x.completion.isupper())

        def helper_reward(inputs):
            return [0.0] * len(inputs)
    """))
    rs = build_reward_set([spec(f"{plugin}:shouty")])
    assert rs.rewards[0].batched is False and rs.names() == ["shouty"]
    assert combine(rs, [inp("HEY"), inp("hey")])[0] == [1.0, 0.0]
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"rewards=[{{name: '{plugin}:shoutey'}}]"])
    message = str(info.value)
    assert "rewards[0].name" in message and "no attribute 'shoutey'" in message and f"'{plugin}'" in message
    assert "helper_reward" in message and "shouty" in message  # the names the file does have
    with pytest.raises(ConfigError, match=r"reward file not found: .*nope\.py"):
        load_config(None, [f"rewards=[{{name: '{tmp_path}/nope.py:fn'}}]"])
    with pytest.raises(RegistryError, match="shoutey"):
        build_reward_set([spec(f"{plugin}:shoutey")])


def test_entry_point_of_an_installed_package(installed_reward_plugin):
    assert installed_reward_plugin in REWARDS and installed_reward_plugin in REWARDS.names()
    assert REWARDS.origin("Politeness") == "entry point lrmm_plugin_pkg lrmm_plugin_mod:politeness"
    cfg = load_config(None, ["rewards=[politeness]"])
    assert combine(build_reward_set(cfg.rewards), [inp("please"), inp("now")])[0] == [1.0, 0.0]
    with pytest.raises(ConfigError, match="Did you mean 'politeness'"):
        load_config(None, ["rewards=[politness]"])


# --- calling conventions -----------------------------------------------------------------------

def test_async_rewards_batched_and_per_sample():
    async def batched(inputs):
        await asyncio.sleep(0)
        return [1.0] * len(inputs)

    running = [0, 0]  # now, most at once

    async def each(x):
        running[0] += 1
        running[1] = max(running)
        await asyncio.sleep(0.05)
        running[0] -= 1
        return float(len(x.completion))

    inputs = [inp("a" * i) for i in range(8)]
    out = score(RewardSet([Reward("b", batched), Reward("e", each, batched=False, timeout=5.0)]), inputs)
    assert out.outcomes["b"].values == [1.0] * 8
    assert out.outcomes["e"].values == [float(i) for i in range(8)]
    assert running[1] == 8  # per-sample coroutines run concurrently
    # Without a timeout too (no worker thread).
    assert score(RewardSet([Reward("e", each, batched=False)]), inputs[:2]).outcomes["e"].values == [0.0, 1.0]


def test_sub_scores_are_logged():
    def parts(inputs):
        return [{"score": 0.5, "fmt": 1.0, "acc": 0.0}, {"score": None, "fmt": 0.0, "acc": None}]

    scored = score_rewards(RewardSet([Reward("p", parts)]), [inp("a"), inp("b")], 2)
    assert scored.metrics["reward/p"] == 0.5 and scored.metrics["reward/p.fmt"] == 0.5
    assert scored.metrics["reward/p.acc"] == 0.0
    assert scored.valid.tolist() == [[True, False]]


# --- routing, weights, None, combine modes ------------------------------------------------------

def _mixed_batch():
    a, b, c = make_sample("a", "geo3k"), make_sample("b", "chart"), make_sample("c", "other")
    return [inp("xx", a, 0), inp("xxxx", a, 0), inp("x", b, 1), inp("xxx", b, 1), inp("q", c, 2), inp("qq", c, 2)]


def test_routing_by_source():
    seen = {}

    def recorder(name):
        def fn(inputs):
            seen[name] = [x.sample.id for x in inputs]
            return [float(len(x.completion)) for x in inputs]
        return fn

    rs = build_reward_set([spec("exact_match", sources=["geo3k"]), spec("boxed_format", sources=["chart"])])
    rs.rewards[0].fn, rs.rewards[1].fn = recorder("geo"), recorder("chart")
    scored = score_rewards(rs, _mixed_batch(), 2)
    assert seen == {"geo": ["a", "a"], "chart": ["b", "b"]}  # each reward sees only its data
    assert scored.rewards.tolist() == [[2.0, 4.0], [1.0, 3.0], [0.0, 0.0]]
    assert scored.valid.tolist() == [[True, True], [True, True], [False, False]]  # no reward for "other"
    m = scored.metrics
    assert m["reward/invalid"] == 2 and m["reward/exact_match/routed"] == 2 and m["reward/boxed_format/routed"] == 2
    assert m["reward/exact_match"] == 3.0 and m["reward/exact_match/std"] == 1.0
    assert m["reward/mean"] == pytest.approx(2.5)  # over the valid completions only
    assert check_routing(rs, [make_sample("a", "geo3k"), make_sample("c", "other")], [make_sample("b", "chart")]) == [
        "other"]


def test_routing_to_a_missing_source_is_an_error():
    rs = build_reward_set([spec("exact_match", sources=["geo3kk"])])
    with pytest.raises(ConfigError, match=r"rewards\[0\]\.sources: 'geo3kk'.*Did you mean 'geo3k'"):
        check_routing(rs, [make_sample("a", "geo3k")], [make_sample("b", "chart")])


def test_weights_and_none_are_excluded_per_sample():
    def half_none(inputs):
        return [None if i % 2 else 1.0 for i in range(len(inputs))]

    rs = RewardSet([Reward("h", half_none, weight=2.0), Reward("l", length, weight=0.5)])
    totals, parts, errors = combine(rs, [inp("ab"), inp("abcd")])
    assert totals == [2.0 + 1.0, 2.0] and parts["h"] == [1.0, None] and errors == {}
    scored = score_rewards(RewardSet([Reward("h", half_none)]), [inp("a"), inp("b")], 2)
    assert scored.valid.tolist() == [[True, False]] and scored.rewards.tolist() == [[1.0, 0.0]]
    assert scored.metrics["reward/h/none_rate"] == 0.5 and scored.metrics["reward/invalid"] == 1


def test_normalize_then_sum_by_hand():
    big = {"a": 100.0, "b": 300.0, "c": 0.0, "d": 0.0}     # group 0: mean 200, std 141.42
    small = {"a": 0.0, "b": 0.0, "c": 1.0, "d": 3.0}       # group 1: mean 2, std 1.4142
    inputs = [inp(k, group=0 if k in "ab" else 1) for k in "abcd"]
    rewards = [Reward("big", lambda xs: [big[x.completion] for x in xs], weight=1.0),
               Reward("small", lambda xs: [small[x.completion] for x in xs], weight=2.0)]
    plain = score_rewards(RewardSet(rewards), inputs, 2)
    assert plain.rewards.tolist() == [[100.0, 300.0], [2.0, 6.0]]
    normed = score_rewards(RewardSet(rewards, combine="normalize_then_sum"), inputs, 2)
    s = 2 ** 0.5 / 2  # (x - mean) / sample std for two values is -+0.7071
    assert normed.rewards.view(-1).tolist() == pytest.approx([-s, s, -2 * s, 2 * s], abs=1e-5)
    # Equal values in a group (std 0) and a lone score give 0; reward/mean stays the raw sum.
    assert normed.metrics["reward/mean"] == plain.metrics["reward/mean"]
    flat = score_rewards(RewardSet([Reward("one", lambda xs: [1.0, 1.0, None, 5.0])], combine="normalize_then_sum"),
                         inputs, 2)
    assert flat.rewards.tolist() == [[0.0, 0.0], [0.0, 0.0]] and flat.valid.tolist() == [[True, True], [False, True]]


def test_scoring_combine_from_config_changes_the_rewards():
    inputs = [inp("a" * k, group=0) for k in (1, 3)]
    cfg = load_config(None, ["rewards=[{name: exact_match}]", "scoring.combine=normalize_then_sum"])
    rs = build_reward_set(cfg.rewards, cfg.scoring)
    rs.rewards[0].fn = length
    assert rs.combine == "normalize_then_sum"
    assert score_rewards(rs, inputs, 2).rewards.view(-1).tolist() == pytest.approx([-0.7071, 0.7071], abs=1e-3)
    rs.combine = "sum_then_normalize"
    assert score_rewards(rs, inputs, 2).rewards.view(-1).tolist() == [1.0, 3.0]
    with pytest.raises(ConfigError, match="scoring.combine.*normalize_then_sum"):
        load_config(None, ["scoring.combine=normalise_then_sum"])


def test_metrics_per_reward():
    def slow(inputs):
        time.sleep(0.05)
        return [1.0, None, 3.0, 1.0]

    scored = score_rewards(RewardSet([Reward("slow", slow)]), [inp("a")] * 4, 2)
    m = scored.metrics
    assert m["reward/slow"] == pytest.approx(5 / 3) and m["reward/slow/std"] == pytest.approx(0.9428, abs=1e-4)
    assert m["reward/slow/none_rate"] == 0.25 and m["reward/slow/time"] >= 0.05
    assert m["reward/slow/errors"] == 0 and m["reward/slow/timeouts"] == 0 and m["reward/errors"] == 0


# --- faults -------------------------------------------------------------------------------------

def test_a_raising_reward_gives_none_is_counted_and_logged_once(caplog):
    def broken(inputs):
        raise ValueError("boom")

    def flaky(x):
        if x.completion == "bad":
            raise KeyError("missing")
        return 1.0

    rs = RewardSet([Reward("broken", broken), Reward("flaky", reward_options(flaky, batched=False), batched=False),
                    Reward("len", length)])
    inputs = [inp("bad"), inp("good"), inp("bad"), inp("ok")]
    with caplog.at_level(logging.DEBUG, logger="lightrft_mm.rewards"):
        for _ in range(2):
            scored = score_rewards(rs, inputs, 2)
    assert scored.metrics["reward/broken/errors"] == 4 and scored.metrics["reward/flaky/errors"] == 2
    assert scored.metrics["reward/errors"] == 6 and scored.metrics["reward/invalid"] == 0
    assert scored.outcomes["flaky"].values == [None, 1.0, None, 1.0]
    assert scored.rewards.view(-1).tolist() == [3.0, 5.0, 3.0, 3.0]  # the other rewards still count
    tracebacks = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(tracebacks) == 2  # the first failure of each reward, once, with its traceback
    assert "ValueError: boom" in tracebacks[0].getMessage() and "Traceback" in tracebacks[0].getMessage()
    assert "KeyError" in tracebacks[1].getMessage() and "sample 's'" in tracebacks[1].getMessage()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e300, -1e39, "1.0", [1.0], True, {"fmt": 1.0},
                                 {"score": "x"}])
def test_bad_values_are_errors(bad):
    out = run_reward(Reward("odd", lambda xs: [1.0, bad]), [inp("a"), inp("b")])
    assert out.values == [1.0, None] and out.status == ["ok", "error"]  # 1e300 would be inf in float32
    with pytest.raises(RewardError, match="odd"):
        run_reward(Reward("odd", lambda xs: [1.0, bad]), [inp("a"), inp("b")], fail_fast=True)


def test_numpy_and_tensor_scalars_are_scores():
    import numpy as np
    import torch

    out = run_reward(Reward("t", lambda xs: [np.float32(0.5), torch.tensor(2.0), np.int64(1)]), [inp("a")] * 3)
    assert out.values == [0.5, 2.0, 1.0] and all(type(v) is float for v in out.values)
    assert run_reward(Reward("t", lambda xs: [torch.ones(2)]), [inp("a")]).status == ["error"]


def test_wrong_count_or_type_is_an_error():
    assert run_reward(Reward("short", lambda xs: [1.0]), [inp("a"), inp("b")]).status == ["error", "error"]
    assert run_reward(Reward("scalar", lambda xs: 1.0), [inp("a")]).status == ["error"]
    failed = run_reward(Reward("exc", lambda xs: [ValueError("server said no"), 2.0]), [inp("a"), inp("b")])
    assert failed.values == [None, 2.0] and failed.status == ["error", "ok"]  # a returned exception fails one sample


@pytest.fixture
def release():
    """Lets the hung rewards of a test go when it ends."""
    event = threading.Event()
    yield event
    event.set()


def test_timeout_stops_a_hanging_reward(release):
    def hangs(inputs):
        release.wait(30)
        return [1.0] * len(inputs)

    def hangs_on_third(x):
        if x.completion == "c":
            release.wait(30)
        return 1.0

    inputs = [inp(c) for c in "abcd"]
    started = time.perf_counter()
    scored = score_rewards(RewardSet([Reward("hang", hangs, timeout=0.3),
                                      Reward("third", hangs_on_third, batched=False, timeout=0.3),
                                      Reward("len", length)]), inputs, 2)
    assert time.perf_counter() - started < 3
    assert scored.metrics["reward/hang/timeouts"] == 4 and scored.metrics["reward/timeouts"] == 6
    assert scored.outcomes["third"].values == [1.0, 1.0, None, None]  # scored before the deadline: kept
    assert scored.outcomes["third"].status == ["ok", "ok", "timeout", "timeout"]
    assert scored.valid.all()


def test_timeout_of_async_rewards(release):
    async def slow_one(x):
        await asyncio.sleep(30 if x.completion == "b" else 0)
        return 2.0

    out = run_reward(Reward("a", slow_one, batched=False, timeout=0.3), [inp("a"), inp("b"), inp("c")])
    assert out.values == [2.0, None, 2.0] and out.status == ["ok", "timeout", "ok"]


def test_timeout_from_config_changes_behaviour(release, fresh_name):
    @register_reward(fresh_name)
    def sleepy(inputs):
        release.wait(0.5)
        return [1.0] * len(inputs)

    short = build_reward_set(load_config(None, [f"rewards=[{{name: {fresh_name}, timeout: 0.1}}]"]).rewards)
    assert short.rewards[0].timeout == 0.1
    assert combine(short, [inp("a")])[0] == [0.0]
    default = build_reward_set(load_config(None, [f"rewards=[{fresh_name}]"]).rewards)
    assert default.rewards[0].timeout == 300.0
    assert combine(default, [inp("a")])[0] == [1.0]


def test_fail_fast_turns_faults_into_errors(release):
    def broken(inputs):
        raise ValueError("boom")

    def hangs(inputs):
        release.wait(30)

    cfg = load_config(None, ["rewards=[exact_match]", "scoring.fail_fast=true"])
    rs = build_reward_set(cfg.rewards, cfg.scoring)
    assert rs.fail_fast is True
    rs.rewards[0].fn = broken
    expected = r"(?s)reward 'exact_match' \(rewards\[0\]\) failed .*ValueError: boom.*fail_fast"
    with pytest.raises(RewardError, match=expected) as info:
        score_rewards(rs, [inp("a"), inp("b")], 2)
    assert isinstance(info.value.__cause__, ValueError)
    per_sample = RewardSet([Reward("p", reward_options(lambda x: 1 / 0, batched=False), batched=False)], fail_fast=True)
    with pytest.raises(RewardError, match="ZeroDivisionError"):
        score(per_sample, [inp("a")])
    with pytest.raises(RewardError, match=r"timed out after 0.2s.*fail_fast"):
        score(RewardSet([Reward("h", hangs, timeout=0.2)], fail_fast=True), [inp("a")])
    assert combine(RewardSet([Reward("b", broken)]), [inp("a")])[2] == {"b": 1}  # off: counted


# --- config -------------------------------------------------------------------------------------

def test_reward_spec_fields_and_the_old_form():
    cfg = load_config("recipes/demo/colors.yaml")
    assert [(r.name, r.weight, r.sources, r.args, r.label) for r in cfg.rewards] == [
        ("exact_match", 1.0, [], {}, ""), ("boxed_format", 0.1, [], {}, "")]
    cfg = build_config({"rewards": [{"name": "overlong", "weight": -1, "sources": "geo3k", "timeout": 5,
                                     "args": {"max_length": 32, "buffer": 8}, "label": "long"}]})
    (r,) = cfg.rewards
    assert (r.sources, r.timeout, r.args, r.label) == (["geo3k"], 5.0, {"max_length": 32, "buffer": 8}, "long")
    reward = build_reward_set(cfg.rewards).rewards[0]
    assert (reward.name, reward.weight, reward.sources, reward.timeout) == ("long", -1.0, ("geo3k",), 5.0)


def test_args_override_and_errors():
    cfg = load_config(None, ["rewards=[{name: overlong, args: {max_length: 10}}]", "rewards.0.args.buffer=2"])
    assert cfg.rewards[0].args == {"max_length": 10, "buffer": 2}
    fn = build_reward_set(cfg.rewards).rewards[0].fn
    assert fn(RewardInput("x", tuple(range(9)), make_sample(), 0)) == pytest.approx(-0.5)
    with pytest.raises(ConfigError) as info:
        load_config(None, ["rewards=[{name: overlong, args: {max_len: 10}}, {name: exact_match, args: {a: 1}}, "
                           "{name: overlong, args: [1]}]"])
    message = str(info.value)
    assert "rewards[0].args.max_len" in message and "Did you mean 'max_length'" in message
    assert "rewards[0].args.max_length: missing" in message
    assert "rewards[1].args: 'exact_match' is a reward function and takes no args" in message
    assert "rewards[2].args: [1] is not a mapping" in message


def test_label_lets_one_reward_appear_twice():
    with pytest.raises(ConfigError, match=r"rewards\[1\]: metric name 'exact_match' is taken by rewards\[0\].*label"):
        load_config(None, ["rewards=[exact_match, exact_match]"])
    cfg = load_config(None, ["rewards=[exact_match, {name: exact_match, label: em_geo, sources: [geo3k]}]"])
    rs = build_reward_set(cfg.rewards)
    assert rs.names() == ["exact_match", "em_geo"]
    metrics = score_rewards(rs, [inp("red", make_sample(source="geo3k")), inp("blue")], 2).metrics
    assert metrics["reward/em_geo"] == 1.0 and metrics["reward/em_geo/routed"] == 1


def test_sources_must_be_names():
    with pytest.raises(ConfigError, match=r"rewards\[0\]\.sources"):
        load_config(None, ["rewards=[{name: exact_match, sources: [1, '']}]"])


def test_including_adds_the_accuracy_reward_with_weight_zero():
    rs = build_reward_set([spec("boxed_format")])
    with_acc = rs.including("exact_match")
    assert with_acc.names() == ["boxed_format", "exact_match"] and with_acc.rewards[1].weight == 0.0
    assert rs.including("boxed_format") is rs
    assert combine(with_acc, [inp("\\boxed{red}")])[0] == [1.0]


def test_evaluation_still_takes_name_fn_weight_tuples():
    fns = [("exact_match", REWARDS.get("exact_match"), 1.0), ("think", REWARDS.get("think_format"), 0.5)]
    totals, parts, errors = combine(fns, [inp("<think>a</think>\\boxed{red}")])
    assert totals == [1.5] and parts == {"exact_match": [1.0], "think": [1.0]} and errors == {}


def test_plugin_check_without_import_keeps_the_other_checks(tmp_path):
    from lightrft_mm.rewards.scoring import plugin_check

    marker = tmp_path / "ran.txt"
    plugin = tmp_path / "plug.py"
    plugin.write_text(f"open({str(marker)!r}, 'w').close()\n\ndef fn(inputs):\n    return [0.0] * len(inputs)\n")
    twice = f"rewards=[{{name: '{plugin}:fn'}}, {{name: '{plugin}:fn'}}]"
    with plugin_check(import_plugins=False) as check:
        with pytest.raises(ConfigError, match=r"rewards\[1\]: metric name 'fn' is taken by rewards\[0\]"):
            load_config(None, [twice, "trainer.accuracy_reward=exact_match"])
    assert check.imported is False and check.names == [f"{plugin}:fn"] * 2 and not marker.exists()
    load_config(None, [f"rewards=[{{name: '{plugin}:fn'}}]"])  # outside it: imported, as training needs
    assert marker.exists()
