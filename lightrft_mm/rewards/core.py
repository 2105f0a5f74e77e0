"""One reward: how it is declared, built from its config entry, and called safely.

A reward is a callable. Batched (the default): `(inputs: list[RewardInput]) -> list[value]`;
per-sample: `(input: RewardInput) -> value`. Either may be `async def`. A value is a float,
`None` (not applicable to that sample), a mapping `{"score": float | None, "<sub>": float, ...}`
whose other keys are named sub-scores (logged as `reward/<name>.<sub>`), or an exception
instance (that sample failed; counted like a raise). A *factory* builds the reward callable from
the config entry's `args` (reward models, remote rewards, parametrised rules).

`run_reward` isolates faults: a reward that raises (anything, `sys.exit()` included), hangs past
its timeout or returns a bad value gives `None` for the affected samples and is counted; its
first traceback is logged once. Only an interrupt (`KeyboardInterrupt`: Ctrl-C) goes through.
With `fail_fast` the same events raise `RewardError` instead. A reward with a timeout runs in a
daemon thread; Python cannot kill a hung call, so it is abandoned there (it cannot block exit).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import numbers
import threading
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

from lightrft_mm.errors import RewardError
from lightrft_mm.schema import Message, Part, Sample

log = logging.getLogger("lightrft_mm.rewards")

_OPTIONS_ATTR = "__lightrft_reward__"
# Not a fault of the reward: Ctrl-C, and a generator being closed. Everything else a reward
# raises, SystemExit included (a plugin calling sys.exit()), is that reward's failure.
_INTERRUPTS = (KeyboardInterrupt, GeneratorExit)


@dataclass(frozen=True)
class RewardInput:
    """What a reward sees for one completion.

    Attributes:
        completion: the generated text (special tokens removed).
        completion_ids: the generated token ids (up to and including end-of-turn).
        sample: the whole Sample: messages with media references, answer, choices, source, meta.
        group: index of the prompt in the step's batch (completions of one prompt share it).
        messages: the prompt messages as the policy saw them (the Sample's, plus the configured
            `data.system_prompt` where the Sample has none). Rule rewards must not read them.
    """

    completion: str
    completion_ids: tuple[int, ...]
    sample: Sample
    group: int
    messages: tuple[Message, ...] | None = None

    def __post_init__(self) -> None:
        if self.messages is None:
            object.__setattr__(self, "messages", tuple(self.sample.messages))


def prompt_messages(sample: Sample, system_prompt: str | None = None) -> tuple[Message, ...]:
    """The Sample's messages with `system_prompt` in front when it has no system message."""
    messages = tuple(sample.messages)
    if system_prompt and not any(m.role == "system" for m in messages):
        messages = (Message("system", [Part("text", text=system_prompt)]),) + messages
    return messages


@dataclass(frozen=True)
class RewardOptions:
    """How a registered object is called.

    Attributes:
        batched: called once with the list of inputs (True) or once per input (False).
        factory: called once with the config entry's `args` to build the reward callable.
    """

    batched: bool = True
    factory: bool = False


def reward_options(fn: Any = None, *, batched: bool = True, factory: bool = False) -> Any:
    """Declares how a reward is called, without registering it (for `file.py:fn` plugins).

    `@reward_options(batched=False)` marks a per-sample reward; `factory=True` a function whose
    keyword arguments come from the config entry's `args` and which returns the reward.
    """
    def mark(obj: Any) -> Any:
        setattr(obj, _OPTIONS_ATTR, RewardOptions(batched=batched, factory=factory))
        return obj

    return mark(fn) if fn is not None else mark


def options_of(obj: Any) -> RewardOptions:
    """The declared options of a reward object (defaults: batched, not a factory)."""
    options = getattr(obj, _OPTIONS_ATTR, None)
    return options if isinstance(options, RewardOptions) else RewardOptions()


@dataclass(eq=False)
class Reward:
    """A reward ready to score: its callable, label, weight, routing and timeout.

    Attributes:
        name: label in metrics and tables (`reward/<name>`).
        fn: the callable (see the module docstring for its forms).
        weight: factor of this reward in the combined reward.
        sources: the `Sample.source` values it applies to; empty = every sample.
        timeout: seconds one call on a step's batch may take (0 = no limit).
        batched: called with the list of inputs (True) or once per input.
        where: where it was configured (`rewards[1]`), for messages.
    """

    name: str
    fn: Callable
    weight: float = 1.0
    sources: tuple[str, ...] = ()
    timeout: float = 0.0
    batched: bool = True
    where: str = ""
    _failure_logged: bool = field(default=False, repr=False)

    def applies_to(self, sample: Sample) -> bool:
        return self.applies_to_source(sample.source)

    def applies_to_source(self, source: str) -> bool:
        return not self.sources or source in self.sources


def label_of(spec_name: str) -> str:
    """Metric name of a config `name`: `path/file.py:fn` and `package.module:fn` give `fn`."""
    return spec_name.rsplit(":", 1)[-1].strip()


def factory_arg_problems(factory: Callable, args: Mapping, where: str, name: str) -> list[str]:
    """Why `factory(**args)` cannot be called (unknown or missing arguments), or []."""
    from lightrft_mm.errors import did_you_mean

    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return []
    named = {k: p for k, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    accepted = ", ".join(k + ("" if p.default is inspect.Parameter.empty else f"={p.default!r}")
                         for k, p in named.items())
    problems = []
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        for key in args:
            if key not in named:
                problems.append(f"{where}.args.{key}: {name!r} has no argument {key!r}."
                                f"{did_you_mean(key, named)} Its arguments: {accepted}.")
    for key, p in named.items():
        if p.default is inspect.Parameter.empty and key not in args:
            problems.append(f"{where}.args.{key}: missing; {name!r} needs it. Its arguments: {accepted}.")
    return problems


def make_reward(spec: Any, where: str = "reward") -> Reward:
    """Builds a `Reward` from a `RewardSpec` (name, weight, sources, timeout, args, label).

    Raises:
        RegistryError: the name is unknown, or its file / module / function does not exist.
        RewardError: `args` do not fit the factory, args given to a plain reward, or the
            factory failed.
    """
    from lightrft_mm.rewards import REWARDS

    obj = REWARDS.get(spec.name)
    options = options_of(obj)
    args = dict(spec.args or {})
    if options.factory:
        problems = factory_arg_problems(obj, args, where, spec.name)
        if problems:
            raise RewardError(problems[0])
        try:
            obj = obj(**args)
        except (RewardError, *_INTERRUPTS):
            raise
        except BaseException as exc:  # noqa: BLE001 - sys.exit() in a factory is its failure too
            raise RewardError(f"{where}: building reward {spec.name!r} with args {args!r} failed: "
                              f"{type(exc).__name__}: {exc}") from exc
        options = options_of(obj)
    elif args:
        raise RewardError(f"{where}.args: {spec.name!r} is a reward function and takes no args (got "
                          f"{sorted(args)}). Fix: remove args, or make it a factory with "
                          "@register_reward(..., factory=True).")
    if not callable(obj):
        raise RewardError(f"{where}: {spec.name!r} resolved to {obj!r}, which is not callable. "
                          "Fix: name a function (or a factory that returns one).")
    return Reward(name=spec.label or label_of(spec.name), fn=obj, weight=float(spec.weight),
                  sources=tuple(spec.sources), timeout=float(spec.timeout), batched=options.batched,
                  where=where)


# --- calling ------------------------------------------------------------------------------------

SKIP, OK, ERROR, TIMEOUT = "skip", "ok", "error", "timeout"


@dataclass
class Outcome:
    """One reward on one batch.

    Attributes:
        values: per input: the score, or None (not applicable, not routed, failed).
        subs: sub-score name -> per-input values.
        status: per input: "skip" (not routed to it), "ok", "error" or "timeout".
        seconds: wall time of the call.
    """

    values: list[float | None]
    subs: dict[str, list[float | None]]
    status: list[str]
    seconds: float

    def select(self, rows) -> "Outcome":
        """This outcome for the inputs `rows` (indices), in that order."""
        return Outcome([self.values[i] for i in rows], {k: [v[i] for i in rows] for k, v in self.subs.items()},
                       [self.status[i] for i in rows], self.seconds)

    @staticmethod
    def concat(parts: list["Outcome"]) -> "Outcome":
        """One outcome over the inputs of `parts`, in order (their calls' time summed)."""
        return Outcome([v for p in parts for v in p.values],
                       {k: [v for p in parts for v in p.subs[k]] for k in parts[0].subs},
                       [s for p in parts for s in p.status], sum(p.seconds for p in parts))

    def count(self, status: str) -> int:
        return sum(s == status for s in self.status)


class _Failure:
    """A failed sample: the exception (or message) and its formatted traceback."""

    def __init__(self, error: BaseException | str, trace: str = ""):
        self.error = error
        self.trace = trace

    def __str__(self) -> str:
        e = self.error
        if isinstance(e, SystemExit):
            return (f"SystemExit: {e} (it called sys.exit(); a reward cannot end the run. Fix: return None "
                    "or raise an exception for a completion it cannot score)")
        return e if isinstance(e, str) else f"{type(e).__name__}: {e}"


_PENDING = object()


class _Timeout(Exception):
    pass


def run_reward(reward: Reward, inputs: list[RewardInput], *, fail_fast: bool = False) -> Outcome:
    """Scores the inputs routed to `reward`; faults give None (or raise with `fail_fast`)."""
    n = len(inputs)
    idx = [i for i, x in enumerate(inputs) if reward.applies_to(x.sample)]
    outcome = Outcome([None] * n, {}, [SKIP] * n, 0.0)
    if not idx:
        return outcome
    batch = [inputs[i] for i in idx]
    started = time.perf_counter()
    raw = _call_batched(reward, batch, fail_fast) if reward.batched else _call_each(reward, batch, fail_fast)
    outcome.seconds = time.perf_counter() - started
    timeouts = 0
    for j, i in enumerate(idx):
        value = raw[j]
        if value is _PENDING:
            outcome.status[i] = TIMEOUT
            timeouts += 1
            continue
        score, subs, problem = _clean(value)
        if problem is not None:
            _failed(reward, batch[j], problem, fail_fast)
            outcome.status[i] = ERROR
            continue
        outcome.values[i] = score
        outcome.status[i] = OK
        for key, v in subs.items():
            outcome.subs.setdefault(key, [None] * n)[i] = v
    if timeouts:
        message = (f"reward {reward.name!r} ({reward.where}) timed out after {reward.timeout:g}s; "
                   f"{timeouts} of {len(idx)} completion(s) get None. Fix: the reward's hang, or raise "
                   f"{reward.where}.timeout")
        if fail_fast:
            raise RewardError(message + " (scoring.fail_fast is true)")
        log.warning(message)
    return outcome


def _call_batched(reward: Reward, batch: list[RewardInput], fail_fast: bool) -> list:
    def call() -> list:
        out = _settle(reward.fn(batch))
        if isinstance(out, (str, bytes, Mapping)) or not hasattr(out, "__iter__"):
            raise RewardError(f"returned {type(out).__name__}, not a list of {len(batch)} values")
        out = list(out)
        if len(out) != len(batch):
            raise RewardError(f"returned {len(out)} values for {len(batch)} inputs")
        return out

    try:
        return _with_timeout(call, reward.timeout, reward.name)
    except _Timeout:
        return [_PENDING] * len(batch)
    except _INTERRUPTS:
        raise
    except BaseException as exc:  # noqa: BLE001 - a broken reward (even sys.exit()) must not end the run
        failure = _Failure(exc, traceback.format_exc())
        _failed(reward, batch[0], failure, fail_fast, of=len(batch))
        return [_Failure(exc)] * len(batch)


def _call_each(reward: Reward, batch: list[RewardInput], fail_fast: bool) -> list:
    results: list = [_PENDING] * len(batch)
    stop = threading.Event()  # tells an abandoned worker to stop after its current sample

    if inspect.iscoroutinefunction(reward.fn) or inspect.iscoroutinefunction(getattr(reward.fn, "__call__", None)):
        def work() -> None:
            try:
                _settle(_gather(reward.fn, batch, results, reward.timeout))
            except _INTERRUPTS:
                raise
            except BaseException as exc:  # noqa: BLE001 - asyncio lets SystemExit through: fail the rest
                failure = _Failure(exc, traceback.format_exc())
                for j, value in enumerate(results):
                    if value is _PENDING:
                        results[j] = failure
    else:
        def work() -> None:
            for j, x in enumerate(batch):
                if stop.is_set():
                    return
                try:
                    results[j] = _settle(reward.fn(x))
                except _INTERRUPTS:
                    raise
                except BaseException as exc:  # noqa: BLE001 - sys.exit() included
                    results[j] = _Failure(exc, traceback.format_exc())
                    if fail_fast:
                        return

    try:
        _with_timeout(work, reward.timeout, reward.name)
    except _Timeout:
        stop.set()
    results = list(results)  # a snapshot: an abandoned worker may still write
    if fail_fast:
        for j, value in enumerate(results):
            if isinstance(value, _Failure):
                _failed(reward, batch[j], value, fail_fast)
    return results


async def _gather(fn: Callable, batch: list[RewardInput], results: list, timeout: float) -> None:
    def store(j: int, task: asyncio.Future) -> None:  # as each finishes: a timeout keeps the done ones
        if not task.cancelled():
            exc = task.exception()
            results[j] = _Failure(exc, "".join(traceback.format_exception(exc))) if exc else task.result()

    tasks = []
    for j, x in enumerate(batch):
        task = asyncio.ensure_future(fn(x))
        task.add_done_callback(lambda t, j=j: store(j, t))
        tasks.append(task)
    _, pending = await asyncio.wait(tasks, timeout=timeout or None)
    for task in pending:
        task.cancel()


def _settle(value: Any) -> Any:
    """Runs a coroutine a reward returned to completion (in a fresh event loop)."""
    if not inspect.isawaitable(value):
        return value

    async def wait() -> Any:
        return await value

    try:
        asyncio.get_running_loop()
    except RuntimeError:  # the usual case; run it outside this handler (a clean traceback if it fails)
        in_loop = False
    else:
        in_loop = True
    if not in_loop:
        return asyncio.run(wait())
    # A loop already runs in this thread (a notebook): run the coroutine in another thread.
    return _with_timeout(lambda: asyncio.run(wait()), float("inf"), "coroutine")


def _with_timeout(fn: Callable[[], Any], timeout: float, name: str) -> Any:
    """`fn()`, abandoned after `timeout` seconds (a daemon thread: hung code cannot block exit)."""
    if not timeout or timeout <= 0:
        return fn()
    timeout = None if math.isinf(timeout) else timeout
    box: dict = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = exc
            box["trace"] = traceback.format_exc()

    thread = threading.Thread(target=target, daemon=True, name=f"reward-{name}")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise _Timeout()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _number(value: Any) -> tuple[float | None, bool]:
    """(float or None, ok): bools, strings, NaN and infinities are not scores, nor a number the
    float32 rewards tensor would turn into an infinity (|x| > 3.4e38)."""
    if value is None:
        return None, True
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # a 0-d tensor / array
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None, False
    value = float(value)
    return (value, True) if math.isfinite(value) and abs(value) <= FLOAT32_MAX else (None, False)


FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max: rewards are float32 tensors


def _clean(value: Any) -> tuple[float | None, dict[str, float | None], Any]:
    """A raw reward value -> (score, sub-scores, problem or None)."""
    if isinstance(value, _Failure):
        return None, {}, value
    if isinstance(value, BaseException):
        return None, {}, _Failure(value)
    if isinstance(value, Mapping):
        if "score" not in value:
            return None, {}, f"returned a mapping without a 'score' key: {_short(value)}"
        score, ok = _number(value["score"])
        subs: dict[str, float | None] = {}
        for key, sub in value.items():
            if key == "score":
                continue
            subs[str(key)], sub_ok = _number(sub)
            ok = ok and sub_ok and isinstance(key, str)
        if not ok:
            return None, {}, f"returned a mapping with a value that is not a finite number: {_short(value)}"
        return score, subs, None
    score, ok = _number(value)
    return (score, {}, None) if ok else (None, {}, f"returned {_short(value)}, not a finite float32 number or None")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _failed(reward: Reward, x: RewardInput, problem: Any, fail_fast: bool, of: int = 1) -> None:
    """Logs a failure (the first of each reward with its traceback) or raises with fail_fast."""
    what = f"on {of} inputs from sample {x.sample.id!r}" if of > 1 else f"on sample {x.sample.id!r}"
    message = f"reward {reward.name!r} ({reward.where}) failed {what}: {problem}"
    if fail_fast:
        cause = problem.error if isinstance(problem, _Failure) and not isinstance(problem.error, str) else None
        raise RewardError(message + "\n(scoring.fail_fast is true; set it to false to score such "
                          "completions None, counted in reward/<name>/errors, and go on)") from cause
    if not reward._failure_logged:
        reward._failure_logged = True
        trace = getattr(problem, "trace", "")
        log.error("%s; its completions get None and are counted in reward/%s/errors (only this first "
                  "failure is logged in full)%s", message, reward.name, f"\n{trace}" if trace else "")
    else:
        log.debug(message)
