"""Reward models with tiny models built offline: the scalar model (value head on a VLM that sees
the image; a sequence-classification model), micro-batching, CPU offload, and the generative
judge (template, verdict parsers, generation through the rollout engine)."""

from __future__ import annotations

import math
import textwrap

import numpy as np
import pytest
import torch

from lightrft_mm.config import load_config
from lightrft_mm.errors import ModelError, RewardError
from lightrft_mm.rewards import REWARDS, Reward, RewardInput, RewardSet, build_reward_set, score
from lightrft_mm.rewards.judge import check_template, number, yes_no
from lightrft_mm.rewards.models import save_value_head
from lightrft_mm.schema import Sample


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("rm_images")
    paths = []
    for i, colour in enumerate([(220, 30, 30), (30, 30, 220)]):
        path = root / f"c{i}.png"
        Image.fromarray(np.full((84, 84, 3), colour, dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def _x(image, completion, sid="q"):
    sample = Sample.from_dict({"id": sid, "source": "colors", "answer": "red", "choices": ["red", "blue"],
                               "messages": [{"role": "user", "content": [{"type": "image", "image": image},
                                                                         {"type": "text", "text": "What colour?"}]}]})
    return RewardInput(completion, (), sample, 0)


@pytest.fixture(scope="module")
def scalar(images):
    return REWARDS.get("scalar_rm")(model="tiny:qwen2_5_vl", micro_batch_size=2, device="cpu")


@pytest.fixture(scope="module")
def batch(images):
    return [_x(images[0], "\\boxed{red}"), _x(images[1], "\\boxed{red}"), _x(images[0], "it is blue, I think"),
            _x(images[1], "")]


def _forward_calls(model):
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


def test_value_head_scores_see_media_and_completion(scalar, batch):
    scores = scalar(batch)
    assert len(scores) == 4 and all(isinstance(s, float) and math.isfinite(s) for s in scores)
    assert scores[0] != pytest.approx(scores[1], abs=1e-4)   # same text, other image
    assert scores[0] != pytest.approx(scores[2], abs=1e-4)   # same image, other completion
    assert scalar(batch) == scores                          # eval mode, deterministic


def test_micro_batches_give_the_same_scores(scalar, batch):
    reference = scalar(batch)
    for size, forwards in ((1, 4), (3, 2), (4, 1)):
        scalar.micro_batch_size = size
        calls, handle = _forward_calls(scalar.model)
        try:
            assert scalar(batch) == pytest.approx(reference, abs=1e-4)  # padding does not change a score
        finally:
            handle.remove()
            scalar.micro_batch_size = 2
        assert len(calls) == forwards


def test_offload_moves_the_model_only_around_scoring(scalar, batch):
    moves = []
    original = type(scalar.model).to

    def spy(module, *args, **kwargs):
        moves.append(str(args[0]) if args else str(kwargs.get("device")))
        return original(module, *args, **kwargs)

    scalar.model.to = spy.__get__(scalar.model)
    try:
        scalar([batch[0]])
        assert moves == []           # colocated without offload: stays where it is
        scalar.offload = True
        scalar([batch[0]])
        assert moves == ["cpu", "cpu"]  # onto its device (cpu here) to score, back to the CPU after
    finally:
        scalar.offload = False
        del scalar.model.to


def test_value_head_folder_round_trip(scalar, batch, tmp_path):
    from lightrft_mm.trainer.checkpoint import save_hf

    folder = save_hf(scalar.model, scalar.processor, tmp_path / "rm")
    with pytest.raises(ModelError, match=r"value_head\.safetensors.*save_value_head"):
        REWARDS.get("scalar_rm")(model=str(folder))
    save_value_head(scalar.head, folder)
    loaded = REWARDS.get("scalar_rm")(model=str(folder), device="cpu")
    assert loaded(batch) == pytest.approx(scalar(batch), abs=1e-4)


def test_sequence_classification_model(tmp_path):
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    from lightrft_mm.models.tiny import QWEN_CHAT_TEMPLATE, build_tokenizer

    tok = build_tokenizer("bpe")
    tok.chat_template = QWEN_CHAT_TEMPLATE
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=2, pad_token_id=tok.pad_token_id)
    Qwen2ForSequenceClassification(config).save_pretrained(tmp_path / "cls")
    tok.save_pretrained(tmp_path / "cls")
    cfg = load_config(None, [f"rewards=[{{name: scalar_rm, args: {{model: '{tmp_path / 'cls'}', label_index: 1, "
                             "micro_batch_size: 3, device: cpu}}]"])
    rm = build_reward_set(cfg.rewards).rewards[0].fn
    inputs = [_x("unused.png", c, sid=str(i)) for i, c in enumerate(["red", "a much longer completion here", "blue"])]
    got = rm(inputs)
    # Each alone (no padding) through the classifier gives the same logit.
    for x, value in zip(inputs, got):
        ids = tok(rm._text(x), return_tensors="pt", add_special_tokens=False)
        assert "What colour?" in rm._text(x) and x.completion in rm._text(x)  # prompt text and completion
        assert rm.model(**ids).logits[0, 1].item() == pytest.approx(value, abs=1e-4)
    with pytest.raises(RewardError, match="label_index 2 is out of range"):
        REWARDS.get("scalar_rm")(model=str(tmp_path / "cls"), label_index=2)


def test_scalar_rm_bad_args():
    with pytest.raises(ModelError, match="no config.json"):
        REWARDS.get("scalar_rm")(model="/nowhere/rm")
    with pytest.raises(RewardError, match="micro_batch_size"):
        REWARDS.get("scalar_rm")(model="tiny:qwen2_5_vl", micro_batch_size=0)


# --- generative judge ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def judge_parser_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("parsers") / "verdicts.py"
    path.write_text(textwrap.dedent("""
        def length(text):
            return float(len(text))
    """))
    return path


@pytest.fixture(scope="module")
def judge(judge_parser_file):
    return REWARDS.get("generative_rm")(model="tiny:qwen2_5_vl", parser=f"{judge_parser_file}:length",
                                        max_new_tokens=6, micro_batch_size=2, device="cpu",
                                        template="Q: {question} Gold: {answer} of {choices} ({source}). "
                                                 "Reply: {completion}. Verdict?")


def test_judge_renders_media_and_template(judge, images):
    rendered = judge.render(_x(images[0], "\\boxed{red}"))
    (turn,) = rendered.messages
    assert [p.type for p in turn.content] == ["image", "text"] and turn.content[0].image == images[0]
    assert turn.content[1].text == "Q: What colour? Gold: red of red, blue (colors). Reply: \\boxed{red}. Verdict?"
    judge.with_media = False
    try:
        assert [p.type for p in judge.render(_x(images[0], "x")).messages[0].content] == ["text"]
    finally:
        judge.with_media = True


def test_judge_generates_and_parses(judge, images):
    from lightrft_mm.rollout.hf import HFRolloutEngine

    assert isinstance(judge.engine, HFRolloutEngine)
    inputs = [_x(images[0], "\\boxed{red}"), _x(images[1], "\\boxed{red}"), _x(images[0], "\\boxed{blue}")]
    out = score(RewardSet([Reward("judge", judge)]), inputs)
    verdicts = judge.last_verdicts
    assert len(verdicts) == 3 and out.outcomes["judge"].values == [float(len(v)) for v in verdicts]
    assert verdicts[0] != verdicts[1]           # the image reaches the judge (greedy, same text)
    assert judge(inputs) == out.outcomes["judge"].values  # greedy: deterministic


def test_a_failing_parser_fails_that_sample_only(judge, images, caplog):
    calls = []

    def first_fails(text):
        calls.append(text)
        if len(calls) == 1:
            raise ValueError("cannot read the verdict")
        return 1.0

    original, judge.parse = judge.parse, first_fails
    try:
        out = score(RewardSet([Reward("judge", judge)]), [_x(images[0], "\\boxed{red}"), _x(images[1], "\\boxed{red}")])
    finally:
        judge.parse = original
    assert out.outcomes["judge"].status == ["error", "ok"] and out.outcomes["judge"].values == [None, 1.0]
    assert "cannot read the verdict" in caplog.text


def test_verdict_parsers():
    assert yes_no("Yes.") == 1.0 and yes_no("no") == 0.0 and yes_no("Well... no. Actually YES") == 1.0
    assert yes_no("maybe") is None and yes_no("yesterday") is None
    assert number("Score: 7/10") == 0.7 and number("I give it 8") == 8.0 and number("-1.5") == -1.5
    assert number("no digits") is None


@pytest.mark.parametrize("template, words", [
    ("{question} {reply}", "unknown field(s) reply"), ("{completion} {", "literal braces"),
    ("{question} only", "add {completion}"),
])
def test_bad_templates(template, words):
    with pytest.raises(RewardError) as info:
        check_template(template)
    assert words in str(info.value)


def test_judge_config_errors():
    with pytest.raises(RewardError, match=r"unknown field\(s\) reply"):
        build_reward_set(load_config(None, ["rewards=[{name: generative_rm, args: {model: 'tiny:qwen2_5_vl', "
                                            "template: '{reply}'}}]"]).rewards)
    from lightrft_mm.errors import RegistryError

    with pytest.raises(RegistryError, match="unknown verdict parser 'yes_or_no'.*did you mean 'yes_no'"):
        REWARDS.get("generative_rm")(model="tiny:qwen2_5_vl", parser="yes_or_no")


# --- the other factory arguments -----------------------------------------------------------------

def test_scalar_rm_seed_dtype_and_system_prompt(scalar, batch):
    reference = scalar(batch[:2])
    other_seed = REWARDS.get("scalar_rm")(model="tiny:qwen2_5_vl", seed=1, device="cpu")
    assert other_seed(batch[:2]) != pytest.approx(reference, abs=1e-4)
    prompted = REWARDS.get("scalar_rm")(model="tiny:qwen2_5_vl", system_prompt="Judge strictly.", device="cpu")
    assert prompted.adapter.system_prompt == "Judge strictly."
    assert prompted(batch[:2]) != pytest.approx(reference, abs=1e-4)  # the same weights see another prompt
    half = REWARDS.get("scalar_rm")(model="tiny:qwen2_5_vl", dtype="bfloat16", device="cpu")
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16} and half.head.weight.dtype == torch.bfloat16
    assert half(batch[:2]) == pytest.approx(reference, abs=0.1)
    with pytest.raises(RewardError, match="dtype 'fp8'"):
        REWARDS.get("scalar_rm")(model="tiny:qwen2_5_vl", dtype="fp8")


def test_device_auto_and_trust_remote_code(monkeypatch, tmp_path):
    from lightrft_mm.rewards import models

    assert models.resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert models.resolve_device("cuda:1") == "cuda:1"
    (tmp_path / "config.json").write_text("{}")
    seen = {}

    def fake_load(folder, trust_remote_code=False):
        seen["trust"] = trust_remote_code
        raise ModelError("stop here")

    monkeypatch.setattr("lightrft_mm.models.load_pretrained", fake_load)
    for flag in (True, False):
        with pytest.raises(ModelError, match="stop here"):
            REWARDS.get("scalar_rm")(model=str(tmp_path), trust_remote_code=flag)
        assert seen["trust"] is flag


def test_judge_system_prompt_max_new_tokens_micro_batch_dtype_offload(images):
    judge = REWARDS.get("generative_rm")(model="tiny:qwen2_5_vl", parser="number", system_prompt="You are a judge.",
                                         max_new_tokens=2, micro_batch_size=1, dtype="bfloat16", device="cpu")
    assert [m.role for m in judge.render(_x(images[0], "x")).messages] == ["system", "user"]
    assert judge.render(_x(images[0], "x")).messages[0].content[0].text == "You are a judge."
    assert {p.dtype for p in judge.model.parameters()} == {torch.bfloat16}
    widths, moves = [], []
    generate, to = judge.engine.generate, type(judge.model).to

    def spy_generate(prompts, n, sampling):
        rollouts = generate(prompts, n, sampling)
        widths.append(rollouts.completion_ids.shape[1])
        return rollouts

    def spy_to(device, *args, **kwargs):
        moves.append(device)
        return to(judge.model, device, *args, **kwargs)

    judge.engine.generate, judge.model.to, judge.offload = spy_generate, spy_to, True
    values = judge([_x(images[0], "a"), _x(images[1], "b"), _x(images[0], "c")])
    assert len(widths) == 3 and max(widths) <= 2  # one generate per micro-batch, verdicts of <= 2 tokens
    assert moves == ["cpu", "cpu"] and len(values) == 3  # to its device (cpu here) and back
