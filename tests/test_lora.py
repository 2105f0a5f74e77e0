"""model.lora: adapters where asked (never the vision tower or the head unless named), only they
train, and a checkpoint holds a merged model transformers reloads plus an adapter peft reloads,
both computing what the trained policy (the rollout's model) computed."""

from __future__ import annotations

import json

import peft  # the [lora] extra, installed by the dev extra
import pytest
import torch

from lightrft_mm.config import load_config
from lightrft_mm.errors import ConfigError
from lightrft_mm.models import load_pretrained
from lightrft_mm.models.lora import apply_lora, lora_targets, merged_state_dict
from lightrft_mm.models.tiny import build_tiny
from lightrft_mm.models.trainable import part_of_each_module
from lightrft_mm.prepare import prepare_synthetic
from lightrft_mm.trainer.loop import train


def lora(**overrides):
    return load_config(None, ["model.lora.r=4", *[f"model.lora.{k}={v}" for k, v in overrides.items()]]).model.lora


@pytest.fixture(scope="module")
def colors(tmp_path_factory):
    return prepare_synthetic("colors", tmp_path_factory.mktemp("colors") / "train", n=16, seed=1)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava", "qwen2_audio"])
def test_default_targets_are_the_language_models_linear_layers(family):
    model, _ = build_tiny(family)
    part = part_of_each_module(model)
    targets = lora_targets(model, lora())
    head = model.get_output_embeddings()
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]
    assert targets == [n for n in linear if part[n] == "llm"] and targets
    assert any(part[n] == "vision" for n in linear)  # there were tower layers to leave out


def test_vision_and_head_only_when_asked():
    model, _ = build_tiny("qwen2_5_vl")
    part = part_of_each_module(model)
    vision = lora_targets(model, lora(parts="[vision]"))
    assert vision and all(part[n] == "vision" for n in vision)
    assert lora_targets(model, lora(target_modules="[q_proj, lm_head]"))[-1] == "lm_head"
    assert all(n.endswith(".q_proj") for n in lora_targets(model, lora(target_modules="[q_proj]")))
    with pytest.raises(ConfigError, match=r"\['qproj'\] match no linear layer.*q_proj"):
        lora_targets(model, lora(target_modules="[qproj]"))


def test_merged_state_dict_is_peft_merge():
    model, _ = build_tiny("qwen2_5_vl", seed=0)
    apply_lora(model, lora())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # B starts at zero: give the adapters something to merge
    ours = merged_state_dict(model.state_dict(), scaling=16.0 / 4)
    plain, _ = build_tiny("qwen2_5_vl", seed=0)
    assert ours.keys() == plain.state_dict().keys()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert layers
    for name, layer in layers.items():
        layer.merge()  # peft's own merge, in place
        torch.testing.assert_close(ours[f"{name}.weight"], layer.base_layer.weight, rtol=0, atol=1e-6)
    untouched = [k for k in ours if k.rpartition(".")[0] not in layers]
    assert all(torch.equal(ours[k], plain.state_dict()[k]) for k in untouched)


@pytest.mark.parametrize("problem,overrides", [
    ("LoRA is off", ["model.lora.target_modules=[q_proj]"]),
    ("every base weight is already frozen", ["model.lora.r=8", "model.freeze=[vision]"]),
    ("are not parts", ["model.lora.r=8", "model.lora.parts=[tower]"]),
    ("unknown key", ["model.lora.rank=8"]),
])
def test_validate_refuses(problem, overrides):
    with pytest.raises(ConfigError, match=problem):
        load_config(None, overrides)


def test_lora_trains_only_adapters_and_checkpoints_reload(colors, tmp_path):
    out = tmp_path / "run"
    reward = tmp_path / "length.py"  # varies within every group: every step has a gradient
    reward.write_text("def length(inputs):\n    return [float(len(x.completion_ids)) for x in inputs]\n")
    summary = train(load_config("recipes/demo/colors.yaml", [
        "model.lora.r=4", "model.gradient_checkpointing=true", f"data.train=[{colors}]", "data.eval=[]",
        "warmup.steps=0", "trainer.max_steps=3", "data.batch_size=4", "rollout.n=4", "trainer.lr=1e-2",
        f"trainer.output_dir={out}", "logging.progress=false", "logging.plot=false",
        f"rewards=[{{name: '{reward}:length'}}]"]))
    ckpt = out / "checkpoint-final"
    base, _ = build_tiny("qwen2_5_vl", seed=0)

    # The merged checkpoint is a plain model of the base's class and names; it differs from the
    # base exactly in the adapted layers' weights.
    merged = load_pretrained(ckpt)[0]
    assert type(merged) is type(base) and not any("lora" in n for n, _ in merged.named_parameters())
    targets = set(lora_targets(base, lora()))
    merged_params = dict(merged.named_parameters())
    for name, p in base.named_parameters():
        moved = not torch.equal(p, merged_params[name])
        assert moved == (name.endswith(".weight") and name[: -len(".weight")] in targets), name

    # The adapter alone, put on a fresh base by peft, computes what the merged model computes.
    with_adapter = peft.PeftModel.from_pretrained(base, str(ckpt / "adapter")).eval()
    ids = torch.randint(3, 100, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(input_ids=ids).logits, merged.eval()(input_ids=ids).logits,
                                   rtol=0, atol=1e-5)

    # Only adapters trained and hold optimizer state; the trained counts say so.
    optimizer = torch.load(ckpt / "optimizer.pt", weights_only=True)["optimizer"]
    assert len(optimizer["state"]) == 2 * len(targets)
    counts = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    adapter_numel = sum(p.numel() for n, p in with_adapter.named_parameters() if "lora_" in n)
    assert counts["params/llm/trainable"] == adapter_numel and counts["params/vision/trainable"] == 0
    assert summary["trained"].startswith(f"vision 0 of {counts['params/vision/frozen']:,}")
    assert f"llm {adapter_numel:,} of" in summary["trained"] and "(LoRA r=4)" in summary["trained"]


def test_rollout_policy_computes_the_merged_model(colors):
    """The engine generates from the LoRA policy itself; its log-probs are the merged weights'."""
    from lightrft_mm.datasets.loader import load_samples
    from lightrft_mm.models.logprobs import forward_logprobs
    from lightrft_mm.processors import make_adapter

    model, processor = build_tiny("qwen2_5_vl", seed=0)
    apply_lora(model, lora(dropout=0.5))  # dropout is off outside training
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.1)
    merged, _ = build_tiny("qwen2_5_vl", seed=0)
    merged.load_state_dict(merged_state_dict(model.state_dict(), scaling=16.0 / 4))
    adapter = make_adapter(model, processor)
    prompts = adapter.encode_prompts(load_samples([colors])[:2])
    ids = torch.randint(3, 100, (2, 5))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ours, _ = forward_logprobs(model.eval(), prompts, ids, mask)
        reference, _ = forward_logprobs(merged.eval(), prompts, ids, mask)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


def test_base_model_is_the_kl_reference_without_a_copy(colors, tmp_path):
    """With LoRA and no warm-up the reference is the policy with its adapters off: the same
    numbers as the loaded base model, and no second model in memory."""
    from lightrft_mm.datasets.loader import load_samples
    from lightrft_mm.models.logprobs import forward_logprobs
    from lightrft_mm.models.lora import adapters_disabled
    from lightrft_mm.processors import make_adapter
    from lightrft_mm.strategy import STRATEGIES
    from lightrft_mm.trainer.setup import build_run

    model, processor = build_tiny("qwen2_5_vl", seed=0)
    base, _ = build_tiny("qwen2_5_vl", seed=0)
    apply_lora(model, lora())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.1)
    adapter = make_adapter(model, processor)
    prompts = adapter.encode_prompts(load_samples([colors])[:2])
    ids, mask = torch.randint(3, 100, (2, 5)), torch.ones(2, 5, dtype=torch.long)
    with torch.no_grad():
        with adapters_disabled(model):
            off, _ = forward_logprobs(model, prompts, ids, mask)
        on, _ = forward_logprobs(model, prompts, ids, mask)
        want, _ = forward_logprobs(base, prompts, ids, mask)
    torch.testing.assert_close(off, want, rtol=0, atol=1e-6)
    assert (on - want).abs().max() > 1e-3  # the adapters are back on after the block
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)

    overrides = ["model.lora.r=4", "algorithm.kl_coef=0.1", f"data.train=[{colors}]", "data.eval=[]",
                 f"trainer.output_dir={tmp_path / 'run'}", "trainer.overwrite=true", "logging.progress=false"]
    strategy = STRATEGIES.get("single")(load_config(None, []).strategy, max_grad_norm=1.0)
    run = build_run(load_config("recipes/demo/colors.yaml", [*overrides, "warmup.steps=0"]), strategy)
    assert run.ref_model is run.model
    run.lock.release()  # the run folder is held until the run ends
    warmed = build_run(load_config("recipes/demo/colors.yaml", [*overrides, "warmup.steps=1"]), strategy)
    assert warmed.ref_model is not None and warmed.ref_model is not warmed.model  # warmed adapters: a copy


def test_kl_to_the_base_model_starts_at_zero_and_grows(colors, tmp_path):
    out = tmp_path / "run"
    reward = tmp_path / "length.py"
    reward.write_text("def length(inputs):\n    return [float(len(x.completion_ids)) for x in inputs]\n")
    train(load_config("recipes/demo/colors.yaml", [
        "model.lora.r=4", "algorithm.kl_coef=0.1", "algorithm.kl_in=loss", f"data.train=[{colors}]", "data.eval=[]",
        "warmup.steps=0", "trainer.max_steps=3", "data.batch_size=4", "rollout.n=4", "trainer.lr=3e-2",
        f"trainer.output_dir={out}", "logging.progress=false", "logging.plot=false",
        f"rewards=[{{name: '{reward}:length'}}]"]))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    kl = [r["loss/kl"] for r in rows if "grad_norm" in r]
    assert kl[0] == 0.0 and kl[-1] > 0  # B starts at zero: the policy is the base model at step 1
