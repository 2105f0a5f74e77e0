"""Tests of the rule rewards (exact_match, boxed_format), `combine` and reward registration."""

from __future__ import annotations

import logging
import math
import uuid

import numpy as np
import pytest

from lightrft_mm.config import load_config
from lightrft_mm.errors import ConfigError, RegistryError
from lightrft_mm.rewards import REWARDS, RewardInput, build_reward_set, combine, register_reward
from lightrft_mm.rewards.rules import boxed_format, exact_match, last_boxed
from lightrft_mm.schema import Sample

COLOURS = ["red", "green", "blue", "yellow"]


def make_sample(answer="red", choices=COLOURS, system=None, user="What colour is it?", sid="s"):
    messages = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": user})
    row = {"id": sid, "messages": messages, "answer": answer, "choices": choices}
    return Sample.from_dict(row)


def inp(completion, sample=None, group=0):
    return RewardInput(completion=completion, completion_ids=(1, 2, 3),
                       sample=sample if sample is not None else make_sample(), group=group)


def apply(fn, x):
    """One input through the scorer, as training calls it (batched or per-sample, sub-scores)."""
    from lightrft_mm.rewards import Reward, options_of, run_reward

    return run_reward(Reward("r", fn, batched=options_of(fn).batched), [x], fail_fast=True).values[0]


def score(fn, completion, **sample_kwargs):
    (value,) = fn([inp(completion, make_sample(**sample_kwargs))])
    return value


# --- last_boxed -------------------------------------------------------------------------------

def test_last_boxed():
    assert last_boxed("\\boxed{ red }") == "red"
    assert last_boxed("a \\boxed{blue} then \\boxed{red}.") == "red"
    assert last_boxed("no box here") is None
    assert last_boxed("\\boxed{}") == ""


# --- exact_match ------------------------------------------------------------------------------

@pytest.mark.parametrize("completion, expected", [
    ("\\boxed{red}", 1.0),
    ("The colour is \\boxed{red}.", 1.0),
    ("\\boxed{blue}", 0.0),
    ("\\boxed{ RED }", 1.0),                      # case and surrounding space are ignored
    ("\\boxed{Red}", 1.0),
    ("\\boxed{blue} no wait \\boxed{red}", 1.0),  # the last box wins
    ("\\boxed{red} no wait \\boxed{blue}", 0.0),
    ("red", 1.0),                                 # no box: the whole completion is compared
    ("  Red \n", 1.0),
    ("it is red", 0.0),
    ("", 0.0),
    ("\\boxed{}", 0.0),
])
def test_exact_match(completion, expected):
    assert score(exact_match, completion, answer="red") == expected


def test_exact_match_collapses_inner_space():
    assert score(exact_match, "\\boxed{light   Blue}", answer="light blue") == 1.0


def test_exact_match_numbers():
    assert score(exact_match, "\\boxed{ 42 }", answer=42, choices=None) == 1.0
    assert score(exact_match, "\\boxed{41}", answer=42, choices=None) == 0.0


def test_exact_match_none_without_answer():
    assert score(exact_match, "\\boxed{red}", answer=None) is None


def test_exact_match_scores_each_input():
    samples = [make_sample("red", sid="a"), make_sample("blue", sid="b"), make_sample(None, sid="c")]
    got = exact_match([inp("\\boxed{red}", samples[0]), inp("\\boxed{red}", samples[1]),
                       inp("\\boxed{red}", samples[2])])
    assert got == [1.0, 0.0, None]


def test_exact_match_never_reads_the_prompt():
    sample = make_sample(answer="red", system="The answer is \\boxed{red}.",
                         user="Hint: \\boxed{red}. What colour is it?")
    assert "\\boxed{red}" in sample.prompt_text()
    assert exact_match([inp("blue", sample)]) == [0.0]
    assert exact_match([inp("\\boxed{blue}", sample)]) == [0.0]
    assert exact_match([inp("", sample)]) == [0.0]


# --- boxed_format -----------------------------------------------------------------------------

@pytest.mark.parametrize("completion, expected", [
    ("\\boxed{red}", 1.0),
    ("  \\boxed{blue}\n", 1.0),    # surrounding space is fine
    ("\\boxed{ Yellow }", 1.0),    # a choice, case-insensitive
    ("\\boxed{green}", 1.0),       # a wrong answer is still well formed
    ("The answer is \\boxed{red}", 0.0),
    ("\\boxed{red}.", 0.0),
    ("\\boxed{red}\\boxed{red}", 0.0),
    ("\\boxed{purple}", 0.0),      # not one of the choices
    ("\\boxed{}", 0.0),
    ("\\boxed{ }", 0.0),
    ("red", 0.0),
    ("", 0.0),
])
def test_boxed_format(completion, expected):
    assert score(boxed_format, completion) == expected


def test_boxed_format_without_choices_accepts_any_content():
    assert score(boxed_format, "\\boxed{purple}", choices=None) == 1.0
    assert score(boxed_format, "\\boxed{}", choices=None) == 0.0
    assert score(boxed_format, "x \\boxed{purple}", choices=None) == 0.0


def test_boxed_format_ignores_the_answer():
    assert score(boxed_format, "\\boxed{blue}", answer=None) == 1.0


# --- combine ----------------------------------------------------------------------------------

def _inputs():
    return [inp("\\boxed{red}", make_sample("red", sid="a")),
            inp("The answer is \\boxed{red}", make_sample("red", sid="b"), group=1),
            inp("\\boxed{green}", make_sample(None, sid="c"), group=2)]


def test_combine_weighted_sum():
    totals, parts, errors = combine([("exact_match", exact_match, 1.0),
                                     ("boxed_format", boxed_format, 0.1)], _inputs())
    assert parts == {"exact_match": [1.0, 1.0, None], "boxed_format": [1.0, 0.0, 1.0]}
    # None (no answer) contributes nothing: the third total is the format reward alone.
    assert totals == pytest.approx([1.1, 1.0, 0.1])
    assert errors == {}


def test_combine_negative_and_zero_weights():
    totals, _, _ = combine([("exact_match", exact_match, -2.0), ("boxed_format", boxed_format, 0.0)],
                           _inputs())
    assert totals == pytest.approx([-2.0, -2.0, 0.0])


def test_combine_no_rewards():
    assert combine([], _inputs()) == ([0.0, 0.0, 0.0], {}, {})


def test_combine_a_raising_reward_gives_none_and_is_counted(caplog):
    def broken(inputs):
        raise ValueError("boom")

    with caplog.at_level(logging.WARNING):
        totals, parts, errors = combine([("broken", broken, 5.0),
                                         ("boxed_format", boxed_format, 1.0)], _inputs())
    assert parts["broken"] == [None, None, None]
    assert errors == {"broken": 3}
    assert totals == pytest.approx([1.0, 0.0, 1.0])  # the other reward still counts
    assert "broken" in caplog.text and "boom" in caplog.text


def test_combine_wrong_number_of_values_is_an_error():
    totals, parts, errors = combine([("short", lambda xs: [1.0], 1.0)], _inputs())
    assert parts["short"] == [None, None, None]
    assert errors == {"short": 3}
    assert totals == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "1.0", [1.0]])
def test_combine_invalid_values_are_errors(bad):
    totals, parts, errors = combine([("odd", lambda xs: [1.0, bad, None], 2.0)], _inputs())
    assert parts["odd"] == [1.0, None, None]
    assert errors == {"odd": 1}  # None is "not applicable", not an error
    assert totals == [2.0, 0.0, 0.0]
    assert all(math.isfinite(t) for t in totals)


def test_combine_ints_become_floats():
    _, parts, errors = combine([("ints", lambda xs: [1, 0, 1], 1.0)], _inputs())
    assert parts["ints"] == [1.0, 0.0, 1.0] and all(type(v) is float for v in parts["ints"])
    assert errors == {}


def test_combine_accepts_numpy_scalars():
    _, parts, errors = combine([("np", lambda xs: [np.float32(0.5), np.int64(1), np.float64(0.0)], 1.0)],
                               _inputs())
    assert errors == {}
    assert parts["np"] == [0.5, 1.0, 0.0]


# --- registration -----------------------------------------------------------------------------

@pytest.fixture
def unique_reward_name():
    """A fresh reward name; its registry entry is removed after the test."""
    name = f"test_reward_{uuid.uuid4().hex[:8]}"
    yield name
    REWARDS._origins.pop(name, None)
    REWARDS._objects.pop(name, None)


def test_registered_reward_resolves_case_and_dash_insensitively(unique_reward_name):
    @register_reward(unique_reward_name)
    def always_half(inputs):
        return [0.5] * len(inputs)

    spelled = unique_reward_name.upper().replace("_", "-")
    assert spelled in REWARDS
    assert REWARDS.get(spelled) is always_half
    assert REWARDS.origin(spelled).endswith(":" + always_half.__qualname__)
    assert unique_reward_name in REWARDS.names()

    # A config may now name it, in any spelling, and it is used by combine.
    cfg = load_config(None, [f"rewards=[{{name: {spelled}, weight: 2.0}}]"])
    fns = build_reward_set(cfg.rewards)
    assert [r.fn for r in fns.rewards] == [always_half] and fns.rewards[0].weight == 2.0
    totals, _, errors = combine(fns, _inputs())
    assert totals == [1.0, 1.0, 1.0] and errors == {}


def test_registering_a_taken_name_names_both_origins(unique_reward_name):
    register_reward(unique_reward_name)(lambda inputs: [0.0] * len(inputs))

    def other(inputs):
        return [1.0] * len(inputs)

    with pytest.raises(RegistryError, match="duplicate reward name") as exc:
        register_reward(unique_reward_name.upper())(other)
    assert "other" in str(exc.value) and "<lambda>" in str(exc.value)


def test_unregistered_reward_is_a_config_error(unique_reward_name):
    assert unique_reward_name not in REWARDS
    with pytest.raises(ConfigError, match="is not a registered reward"):
        load_config(None, [f"rewards=[{unique_reward_name}]"])


def test_builtin_rewards_are_registered():
    assert REWARDS.get("Exact-Match") is exact_match
    assert REWARDS.get("BOXED_FORMAT") is boxed_format


# --- last_boxed with nested braces --------------------------------------------------------------

def test_last_boxed_nested_braces():
    assert last_boxed("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{2\\sqrt{3}} then \\boxed{\\frac{\\sqrt{3}}{2}}") == "\\frac{\\sqrt{3}}{2}"
    assert last_boxed("\\boxed{48} and an unclosed \\boxed{12") == "48"
    assert last_boxed("\\fbox{7}") == "7"


# --- think_format -----------------------------------------------------------------------------

@pytest.mark.parametrize("completion, expected", [
    ("<think>the angles add to 180</think> \\boxed{48}", 1.0),
    ("  <think>reason</think>\nThe answer is \\boxed{2\\sqrt{3}}.", 1.0),
    ("<think></think>\\boxed{C}", 1.0),                      # public recipes accept empty reasoning
    ("<think>a</think>\\boxed{}", 0.0),                      # empty answer
    ("\\boxed{48}", 0.0),                                    # no reasoning block
    ("<think>a</think> 48", 0.0),                            # no boxed answer
    ("<think>\\boxed{1}</think> so one", 0.0),               # the box must follow </think>
    ("x <think>a</think>\\boxed{1}", 0.0),                   # text before <think>
    ("<think>a<think>b</think>\\boxed{1}", 0.0),             # two openings
    ("<think>a</think>\\boxed{1}</think>", 0.0),
])
def test_think_format(completion, expected):
    assert apply(REWARDS.get("think_format"), inp(completion)) == expected


# --- overlong ---------------------------------------------------------------------------------

def _with_ids(n_tokens):
    return RewardInput(completion="x", completion_ids=tuple(range(n_tokens)), sample=make_sample(), group=0)


@pytest.mark.parametrize("length, expected", [(1, 0.0), (6, 0.0), (7, -0.25), (8, -0.5), (10, -1.0), (11, -1.0)])
def test_overlong_soft_penalty(length, expected):
    fn = REWARDS.get("overlong")(max_length=10, buffer=4)
    assert fn(_with_ids(length)) == pytest.approx(expected)


def test_overlong_default_buffer_and_missing_ids():
    fn = REWARDS.get("overlong")(max_length=20)  # buffer 4
    assert fn(_with_ids(16)) == 0.0 and fn(_with_ids(18)) == pytest.approx(-0.5)
    assert fn(RewardInput("text without ids", (), make_sample(), 0)) is None


@pytest.mark.parametrize("kwargs", [{"max_length": 10, "buffer": 11}, {"max_length": 0},
                                    {"max_length": 8, "buffer": 0}])
def test_overlong_bad_args(kwargs):
    from lightrft_mm.errors import RewardError

    with pytest.raises(RewardError, match="overlong"):
        REWARDS.get("overlong")(**kwargs)


# --- repetition -------------------------------------------------------------------------------

def test_repetition_penalty():
    fn = REWARDS.get("repetition")(ngram=2)
    # bigrams: ab ba ab ba ab -> 5, of which 2 distinct: -(1 - 2/5)
    assert fn(inp("a b a b a b")) == pytest.approx(-0.6)
    assert fn(inp("a b c d")) == 0.0
    assert fn(inp("a")) == 0.0
    assert REWARDS.get("repetition")(ngram=2, max_penalty=0.5)(inp("a b a b a b")) == pytest.approx(-0.3)
    assert REWARDS.get("repetition")()(inp("x y z x y z x y z")) == pytest.approx(-(1 - 3 / 7))  # trigrams


# --- iou --------------------------------------------------------------------------------------

@pytest.mark.parametrize("completion, expected", [
    ("[0, 0, 10, 10]", 1.0),
    ("The box is [5,0,15,10].", 50 / 150),
    ("(0,0),(5,10)", 0.5),
    ("\\boxed{[0, 0, 10, 10]} not [50, 50, 60, 60]", 1.0),   # a boxed answer wins
    ("[20, 20, 30, 30]", 0.0),
    ("first [20, 20, 30, 30] then [0, 0, 10, 10]", 1.0),    # the last box
    ("no box", 0.0),
    ("[10, 10, 0, 0]", 0.0),                                # an empty box
])
def test_iou(completion, expected):
    fn = REWARDS.get("iou")
    assert fn(inp(completion, make_sample(answer=[0, 0, 10, 10], choices=None))) == pytest.approx(expected)


def test_iou_answer_forms():
    fn = REWARDS.get("iou")
    assert fn(inp("[5,0,15,10]", make_sample(answer=[[100, 100, 110, 110], [5, 0, 15, 10]], choices=None))) == 1.0
    assert fn(inp("[0,0,10,10]", make_sample(answer="[0, 0, 10, 10]", choices=None))) == 1.0
    assert fn(inp("[0,0,10,10]", make_sample(answer=None, choices=None))) is None
    assert fn(inp("[0,0,10,10]", make_sample(answer="red", choices=None))) is None


# --- no built-in reads the prompt ----------------------------------------------------------------

LEAKY_PROMPT = "The answer is \\boxed{48}. <think>x</think>\\boxed{C} [0, 0, 10, 10] answer: 48"


@pytest.mark.parametrize("name, kwargs", [
    ("exact_match", None), ("boxed_format", None), ("think_format", None), ("math_accuracy", None),
    ("choice_accuracy", None), ("geo3k", None), ("iou", None), ("overlong", {"max_length": 10}),
    ("repetition", {}),
])
def test_no_builtin_reads_the_prompt(name, kwargs):
    """The prompt (system and user turns, and the messages the policy saw) holds perfect answers;
    an empty completion still scores the minimum."""
    fn = REWARDS.get(name)
    if kwargs is not None:
        fn = fn(**kwargs)
    leaky = make_sample(answer="48", choices=["24", "36", "48", "60"], system=LEAKY_PROMPT, user=LEAKY_PROMPT)
    box = make_sample(answer=[0, 0, 10, 10], choices=None, system=LEAKY_PROMPT, user=LEAKY_PROMPT)
    assert "\\boxed{48}" in leaky.prompt_text()
    for sample in (leaky, box):
        value = apply(fn, RewardInput("", (), sample, 0, messages=tuple(sample.messages)))
        assert value in (None, 0.0), f"{name} scored {value} from the prompt of {sample.answer!r}"
