"""trainer.padding_free: the rows of a forward packed into one sequence give the padded forward's
log-probs, entropies and gradients for every family, and the decoder sees only real tokens."""

from __future__ import annotations

import pytest
import torch

from lightrft_mm.models.logprobs import forward_logprobs
from lightrft_mm.models.parts import model_parts
from lightrft_mm.models.tiny import build_tiny
from lightrft_mm.processors import make_adapter
from tests.test_shared import FAMILIES, N, _samples, media  # noqa: F401  (media is a fixture)


def ragged(prompts, adapter, seed: int):
    """A completion per row with widely varying lengths (1 .. 9 tokens of 10), of ordinary
    tokens (the rollout never samples media placeholders)."""
    g = torch.Generator().manual_seed(seed)
    rows = prompts.input_ids.shape[0]
    ordinary = torch.tensor(sorted(set(range(3, 200)) - set(adapter.special_ids_to_suppress())))
    ids = ordinary[torch.randint(0, len(ordinary), (rows, 10), generator=g)]
    lengths = torch.randint(1, 10, (rows,), generator=g)
    mask = (torch.arange(10)[None] < lengths[:, None]).long()
    return ids, mask


def decoder_tokens(model):
    """Positions the first decoder layer processes, over the forwards run while counting."""
    first = model_parts(model).blocks
    layer = next(b for b in first if "language_model" in type(b).__module__ or "Decoder" in type(b).__name__)
    seen = []
    handle = layer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).shape[:2].numel()),
        with_kwargs=True)
    return seen, handle


@pytest.mark.parametrize("family", [*FAMILIES, "qwen2"])
@pytest.mark.parametrize("share", [True, False], ids=["shared-media", "per-row-media"])
def test_packed_forward_equals_the_padded_one(family, share, media, attn="sdpa"):  # noqa: F811
    torch.manual_seed(0)
    model, processor = build_tiny(family)
    model.set_attn_implementation(attn)
    adapter = make_adapter(model, processor)
    samples = _samples(family, media) if family != "qwen2" else _samples("qwen2_audio", media)[1:] * 2
    prompts = adapter.encode_prompts(samples).repeat(N, adapter.pad_token_id)
    ids, mask = ragged(prompts, adapter, seed=1)
    temps = torch.linspace(0.7, 1.3, ids.shape[1])  # per-position temperatures (FIRE)
    results = {}
    for packed in (False, True):
        model.zero_grad()
        seen, handle = decoder_tokens(model)
        try:
            logps, entropy = forward_logprobs(model, prompts, ids, mask, temperature=temps, with_entropy=True,
                                              share_media=share, packed=packed)
        finally:
            handle.remove()
        ((logps + 0.1 * entropy) * mask).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[packed] = logps.detach(), entropy.detach(), grads, sum(seen)
    (lp, ent, grads, tokens), (lp_p, ent_p, grads_p, tokens_p) = results[False], results[True]
    real = mask.bool()
    assert (lp_p - lp)[real].abs().max().item() <= 1e-5
    assert (ent_p - ent)[real].abs().max().item() <= 1e-5
    assert grads.keys() == grads_p.keys()
    for name in grads:
        # fp32 sums in another order: measured up to 3.6e-6 on one element of a gradient whose
        # largest is 4.1 (LLaVA-NeXT), so the absolute tolerance follows the gradient's scale.
        scale = max(1.0, grads[name].abs().max().item())
        torch.testing.assert_close(grads_p[name], grads[name], rtol=1e-4, atol=1e-6 * scale, msg=name)
    # The padded forward runs every row at full width; the packed one only the real tokens.
    assert tokens == ids.shape[0] * (prompts.input_ids.shape[1] + ids.shape[1])
    assert tokens_p == int(prompts.attention_mask.sum()) + int(mask.sum()) < tokens


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_packed_forward_equals_the_padded_one_with_eager_attention(family, media):  # noqa: F811
    test_packed_forward_equals_the_padded_one(family, True, media, attn="eager")


def test_rows_cannot_attend_across_the_pack(media):  # noqa: F811
    """Changing one row's tokens changes no other row's log-probs in the packed forward."""
    model, processor = build_tiny("qwen2_5_vl", seed=0)
    adapter = make_adapter(model, processor)
    prompts = adapter.encode_prompts(_samples("qwen2_5_vl", media)).repeat(N, adapter.pad_token_id)
    ids, mask = ragged(prompts, adapter, seed=2)
    with torch.no_grad():
        before, _ = forward_logprobs(model, prompts, ids, mask, packed=True)
        changed = ids.clone()
        changed[0] = changed[1]
        after, _ = forward_logprobs(model, prompts, changed, mask, packed=True)
    others = mask[1:].bool()
    assert torch.equal(before[1:][others], after[1:][others])
    assert not torch.equal(before[0][mask[0].bool()], after[0][mask[0].bool()])


def test_training_with_padding_free_matches_the_padded_run(tmp_path):
    """The same two GRPO steps (micro-batched, high-entropy selection) with and without packing."""
    import json

    from lightrft_mm.config import load_config
    from lightrft_mm.prepare import prepare_synthetic
    from lightrft_mm.trainer.loop import train

    data = prepare_synthetic("colors", tmp_path / "colors", n=8, seed=1)
    reward = tmp_path / "length.py"  # varies within every group: every step has a gradient
    reward.write_text("def length(inputs):\n    return [float(len(x.completion_ids)) for x in inputs]\n")
    rows = {}
    for packed in (False, True):
        out = tmp_path / f"run-{packed}"
        train(load_config("recipes/demo/colors.yaml", [
            f"trainer.padding_free={str(packed).lower()}", f"data.train=[{data}]", "data.eval=[]", "warmup.steps=0",
            "trainer.max_steps=2", "data.batch_size=4", "rollout.n=4", "trainer.micro_batch_groups=1",
            "algorithm.high_entropy_ratio=0.5", "trainer.lr=1e-2", f"trainer.output_dir={out}",
            "logging.progress=false", "logging.plot=false", f"rewards=[{{name: '{reward}:length'}}]"]))
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        rows[packed] = [r for r in lines if "grad_norm" in r]
    assert len(rows[True]) == 2
    for padded, packed in zip(rows[False], rows[True], strict=True):
        assert packed["reward/mean"] == padded["reward/mean"]  # the same completions
        for key in ("loss/loss", "grad_norm", "loss/ratio_mean"):
            assert packed[key] == pytest.approx(padded[key], rel=1e-4, abs=1e-6), key


def test_attn_implementation_reaches_the_model_and_flash_needs_its_package():
    import importlib.util

    from lightrft_mm.config import load_config
    from lightrft_mm.errors import ConfigError
    from lightrft_mm.models import load_policy

    cfg = load_config(None, ["model.name_or_path=tiny:llava", "model.attn_implementation=eager"])
    model, _ = load_policy(cfg.model)
    assert model.config._attn_implementation == "eager"
    assert model.config.get_text_config()._attn_implementation == "eager"
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ConfigError, match="flash-attn"):
            load_config(None, ["model.attn_implementation=flash_attention_2"])
