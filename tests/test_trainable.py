"""model.freeze and model.gradient_checkpointing: frozen parts stay bit-identical and hold no
optimizer state, the others train; checkpointing gives the same gradients with less kept."""

from __future__ import annotations

import json

import pytest
import torch

from lightrft_mm.config import load_config
from lightrft_mm.errors import ConfigError
from lightrft_mm.models import load_pretrained
from lightrft_mm.models.tiny import build_tiny
from lightrft_mm.models.trainable import apply_trainable, part_of_each_parameter
from lightrft_mm.prepare import prepare_synthetic
from lightrft_mm.trainer.loop import train


@pytest.fixture(scope="module")
def colors(tmp_path_factory):
    return prepare_synthetic("colors", tmp_path_factory.mktemp("colors") / "train", n=16, seed=1)


def test_parts_cover_every_parameter_once():
    model, _ = build_tiny("llava_next")
    groups = part_of_each_parameter(model)
    assert sum(len(v) for v in groups.values()) == len(list(model.parameters()))
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("vision_tower" in names[id(p)] for p in groups["vision"])
    assert {names[id(p)].split(".")[1] for p in groups["projector"]} == {"multi_modal_projector", "image_newline"}
    assert all("language_model" in names[id(p)] or "lm_head" in names[id(p)] for p in groups["llm"])


@pytest.mark.parametrize("frozen", [["vision"], ["llm"], ["vision", "projector"]])
def test_frozen_parts_stay_bit_identical_and_get_no_optimizer_state(frozen, colors, tmp_path):
    out = tmp_path / "run"
    reward = tmp_path / "length.py"  # varies within every group: every step has a gradient
    reward.write_text("def length(inputs):\n    return [float(len(x.completion_ids)) for x in inputs]\n")
    cfg = load_config("recipes/demo/colors.yaml", [
        f"model.freeze={frozen}", f"data.train=[{colors}]", "data.eval=[]", "warmup.steps=0", "trainer.max_steps=2",
        "data.batch_size=4", "rollout.n=4", "trainer.lr=1e-2", f"trainer.output_dir={out}", "logging.progress=false",
        "logging.plot=false", f"rewards=[{{name: '{reward}:length'}}]"])
    before, _ = build_tiny("qwen2_5_vl", seed=0)
    groups = part_of_each_parameter(before)
    names = {id(p): n for n, p in before.named_parameters()}
    train(cfg)
    after = dict(load_pretrained(out / "checkpoint-final")[0].named_parameters())
    for part, params in groups.items():
        same = [torch.equal(p.detach(), after[names[id(p)]].detach()) for p in params]
        if part in frozen:
            assert all(same), f"{part} moved while frozen"
        else:
            assert not all(same), f"{part} did not train"
    optimizer = torch.load(out / "checkpoint-final" / "optimizer.pt", weights_only=True)["optimizer"]
    trainable = sum(len(v) for k, v in groups.items() if k not in frozen)
    assert len(optimizer["state"]) == trainable and len(optimizer["param_groups"][0]["params"]) == trainable
    counts = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    for part, params in groups.items():
        n = sum(p.numel() for p in params)
        assert counts[f"params/{part}/frozen"] == (n if part in frozen else 0)
        assert counts[f"params/{part}/trainable"] == (0 if part in frozen else n)


def test_freeze_is_validated():
    with pytest.raises(ConfigError, match="model.freeze: \\['vison'\\] are not parts"):
        load_config("recipes/demo/colors.yaml", ["model.freeze=[vison]"])
    with pytest.raises(ConfigError, match="nothing would train"):
        load_config("recipes/demo/colors.yaml", ["model.freeze=[vision, projector, llm]"])


def _saved_bytes_and_grads(checkpointing: bool, image_samples):
    from lightrft_mm.models.logprobs import forward_logprobs
    from lightrft_mm.processors import make_adapter

    model, processor = build_tiny("qwen2_5_vl", seed=0)
    cfg = load_config(None, [f"model.gradient_checkpointing={str(checkpointing).lower()}"])
    apply_trainable(model, cfg.model)
    model.train()
    adapter = make_adapter(model, processor)
    prompts = adapter.encode_prompts(image_samples).repeat(2, adapter.pad_token_id)
    ids = torch.randint(3, 60, (prompts.input_ids.shape[0], 6), generator=torch.Generator().manual_seed(0))
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logps, _ = forward_logprobs(model, prompts, ids, torch.ones_like(ids))
    logps.sum().backward()
    return sum(saved), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_keeps_less_and_gives_the_same_gradients(image_samples):
    plain_bytes, plain = _saved_bytes_and_grads(False, image_samples)
    ckpt_bytes, ckpt = _saved_bytes_and_grads(True, image_samples)
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)
    assert ckpt_bytes < 0.7 * plain_bytes, (ckpt_bytes, plain_bytes)
