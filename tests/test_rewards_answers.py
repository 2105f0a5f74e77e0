"""Hand cases of the answer checkers: math_accuracy (math-verify), choice_accuracy and geo3k."""

from __future__ import annotations

import pytest

from lightrft_mm.rewards import REWARDS, Reward, RewardInput, RewardSet, options_of, run_reward, score_rewards
from lightrft_mm.rewards.answers import choice_index, final_answer
from lightrft_mm.schema import Sample

GEO_CHOICES = ["24", "36", "48", "60"]


def make_sample(answer, choices=None, sid="g"):
    return Sample.from_dict({"id": sid, "source": "geo3k", "answer": answer, "choices": choices,
                             "messages": [{"role": "user", "content": "Find x."}]})


def run(name, completion, answer, choices=None):
    fn = REWARDS.get(name)
    x = RewardInput(completion, (1,), make_sample(answer, choices), 0)
    return run_reward(Reward(name, fn, batched=options_of(fn).batched), [x], fail_fast=True).values[0]


@pytest.mark.parametrize("completion, expected", [
    ("\\boxed{2\\sqrt{3}}", 1.0),
    ("<think>30-60-90 triangle</think> so x = \\boxed{2\\sqrt{3}}.", 1.0),
    ("\\boxed{\\sqrt{12}}", 1.0),            # equal as math
    ("\\boxed{2 \\sqrt 3}", 1.0),
    ("The answer is 2\\sqrt{3}", 1.0),       # no box: after "answer is"
    ("\\boxed{4\\sqrt{3}}", 0.0),
    ("\\boxed{3.46}", 0.0),                  # a rounded value is not the exact answer
    ("2\\sqrt{3}", 0.0),                     # no final answer marked
    ("", 0.0),
])
def test_math_accuracy_sqrt(completion, expected):
    assert run("math_accuracy", completion, "2\\sqrt{3}") == expected


@pytest.mark.parametrize("completion, expected", [
    ("\\boxed{\\frac{1}{2}}", 1.0), ("\\boxed{0.5}", 1.0), ("\\boxed{1/2}", 1.0), ("\\boxed{\\dfrac{1}{2}}", 1.0),
    ("\\boxed{\\frac{2}{4}}", 1.0), ("Answer: $\\frac{1}{2}$", 1.0), ("\\boxed{2}", 0.0),
    ("\\boxed{\\frac{1}{3}}", 0.0),
])
def test_math_accuracy_fraction(completion, expected):
    assert run("math_accuracy", completion, "\\frac{1}{2}") == expected


@pytest.mark.parametrize("completion, expected", [
    ("\\boxed{48}", 1.0), ("\\boxed{48.0}", 1.0), ("\\boxed{48^\\circ}", 1.0), ("\\boxed{x = 48}", 1.0),
    ("so the answer is 48.", 1.0), ("\\boxed{47}", 0.0),
    ("\\boxed{48} wait, \\boxed{36}", 0.0),   # the last box counts
    ("\\boxed{36} no: \\boxed{48}", 1.0),
    ("\\boxed{C}", 1.0), ("\\boxed{(C)}", 1.0), ("\\boxed{c}", 1.0), ("The answer is C.", 1.0),   # choice letters
    ("\\boxed{A}", 0.0), ("\\boxed{E}", 0.0),  # another choice; no fifth choice
])
def test_math_accuracy_geo3k_choices(completion, expected):
    assert run("math_accuracy", completion, "48", GEO_CHOICES) == expected


def test_math_accuracy_letter_answer_and_no_answer():
    assert run("math_accuracy", "\\boxed{48}", "C", GEO_CHOICES) == 1.0
    assert run("math_accuracy", "\\boxed{C}", "C", GEO_CHOICES) == 1.0
    assert run("math_accuracy", "\\boxed{36}", "C", GEO_CHOICES) == 0.0
    assert run("math_accuracy", "\\boxed{48}", None) is None
    assert run("math_accuracy", "\\boxed{C}", "48") == 0.0     # without choices a letter is just a letter


def test_math_accuracy_word_answers_compare_as_text():
    assert run("math_accuracy", "\\boxed{Red}", "red") == 1.0
    assert run("math_accuracy", "\\boxed{der}", "red") == 0.0  # not r*e*d as a product of symbols


@pytest.mark.parametrize("completion, expected", [
    ("\\boxed{C}", 1.0), ("\\boxed{48}", 1.0), ("answer: (C)", 1.0), ("\\boxed{B}", 0.0), ("\\boxed{36}", 0.0),
    ("\\boxed{48.0}", 0.0),    # names no choice exactly
    ("no answer", 0.0),
])
def test_choice_accuracy(completion, expected):
    assert run("choice_accuracy", completion, "48", GEO_CHOICES) == expected


def test_choice_accuracy_not_applicable():
    assert run("choice_accuracy", "\\boxed{48}", "48") is None                 # no choices
    assert run("choice_accuracy", "\\boxed{48}", "50", GEO_CHOICES) is None    # answer not a choice
    assert run("choice_accuracy", "\\boxed{48}", None, GEO_CHOICES) is None
    assert run("choice_accuracy", "\\boxed{ Blue }", "blue", ["red", "blue"]) == 1.0


@pytest.mark.parametrize("completion, expected", [
    ("<think>angles</think>\\boxed{48}", 1.0),
    ("\\boxed{48}", 0.9),
    ("<think>angles</think>\\boxed{47}", 0.1),
    ("48", 0.0),
])
def test_geo3k_is_point_nine_accuracy_plus_point_one_format(completion, expected):
    assert run("geo3k", completion, "48", GEO_CHOICES) == pytest.approx(expected)
    assert run("geo3k", completion, None) is None


def test_geo3k_logs_its_parts():
    samples = [make_sample("48", GEO_CHOICES, sid=f"g{i}") for i in range(2)]
    inputs = [RewardInput("<think>a</think>\\boxed{48}", (1,), samples[0], 0),
              RewardInput("\\boxed{36}", (1,), samples[1], 1)]
    scored = score_rewards(RewardSet([Reward("geo3k", REWARDS.get("geo3k"), batched=False)]), inputs, 1)
    assert scored.rewards.view(-1).tolist() == pytest.approx([1.0, 0.0])
    assert scored.metrics["reward/geo3k.accuracy"] == 0.5
    assert scored.metrics["reward/geo3k.format"] == 0.5


def test_final_answer_and_choice_index():
    assert final_answer("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert final_answer("so the final answer is: $48$.") == "48"
    assert final_answer("\\boxed{}") is None
    assert final_answer("I think 48") is None
    assert choice_index("(b)", GEO_CHOICES) == 1
    assert choice_index("60", GEO_CHOICES) == 3
    assert choice_index("Z", GEO_CHOICES) is None
    assert choice_index("B", None) is None
    assert choice_index("B", ["A", "B"]) == 1  # a choice that is a letter is taken literally
