"""Each prompt's media encoded once per group: same numbers as the per-row path, a fraction of the work."""

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from lightrft_mm.datasets.synthetic_video import write_mp4
from lightrft_mm.models.logprobs import forward_logprobs
from lightrft_mm.models.shared import prompt_groups
from lightrft_mm.models.tiny import build_tiny
from lightrft_mm.processors import make_adapter
from lightrft_mm.rollout.hf import HFRolloutEngine, SamplingParams
from lightrft_mm.schema import Sample
from lightrft_mm.trainer.experience import select_rows

N = 3


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared")
    rng = np.random.default_rng(0)
    for name, shape in (("a.png", (84, 84, 3)), ("b.png", (56, 112, 3))):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / name)
    write_mp4(root / "v.mp4", rng.integers(0, 256, (4, 56, 56, 3), dtype=np.uint8), fps=2)
    t = np.arange(16000) / 16000
    sf.write(root / "t.wav", 0.3 * np.sin(2 * np.pi * 440 * t), 16000)
    return root


def _samples(family, root):
    def row(sid, parts, text):
        return Sample.from_dict({"id": sid, "messages": [{"role": "user", "content": parts + [
            {"type": "text", "text": text}]}]})
    image = lambda name: {"type": "image", "image": str(root / name)}  # noqa: E731
    if family == "qwen2_audio":
        return [row("a", [{"type": "audio", "audio": str(root / "t.wav")}], "Is the tone high or low?"),
                row("t", [], "Say hi.")]
    rows = [row("a", [image("a.png")], "What colour is it?"), row("b", [image("b.png"), image("a.png")], "Hi")]
    if family == "qwen2_5_vl":
        rows.append(row("v", [{"type": "video", "video": str(root / "v.mp4")}], "Which way does it move?"))
    return rows


def _encoder(model):
    base = model.model
    for name in ("visual", "vision_tower", "audio_tower"):
        if hasattr(base, name):
            return getattr(base, name)
    return model.audio_tower


def _count_rows(module):
    """Count the leading-dimension rows fed to `module` (patches, images or audio clips)."""
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args, kwargs: seen.append(
        int((args[0] if args else next(iter(kwargs.values()))).shape[0])), with_kwargs=True)
    return seen, handle


FAMILIES = ["qwen2_5_vl", "qwen2_vl", "llava", "llava_next", "qwen2_audio"]


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request, media):
    torch.manual_seed(0)
    model, processor = build_tiny(request.param)
    adapter = make_adapter(model, processor)
    return request.param, model, adapter, adapter.encode_prompts(_samples(request.param, media))


def test_rollout_prefill_once_gives_the_same_completions_with_1_over_n_of_the_encoder_work(setup):
    family, model, adapter, prompts = setup
    sampling = SamplingParams(max_new_tokens=6, greedy=True)
    seen, handle = _count_rows(_encoder(model))
    try:
        shared = HFRolloutEngine(model, adapter).generate(prompts, N, sampling)
        shared_rows = sum(seen)
        seen.clear()
        plain = HFRolloutEngine(model, adapter, share_prefill=False).generate(prompts, N, sampling)
        plain_rows = sum(seen)
    finally:
        handle.remove()
    assert torch.equal(shared.completion_ids, plain.completion_ids)
    assert (shared.logps - plain.logps).abs().max().item() <= 1e-5
    assert plain_rows == N * shared_rows > 0


def test_sampled_rollouts_keep_logprob_parity_with_the_trainer(setup):
    family, model, adapter, prompts = setup
    torch.manual_seed(1)
    r = HFRolloutEngine(model, adapter).generate(prompts, N, SamplingParams(max_new_tokens=8, temperature=0.9))
    logps, _ = forward_logprobs(model, r.prompts, r.completion_ids, r.completion_mask, temperature=0.9)
    assert ((logps - r.logps).abs() * r.completion_mask).max().item() <= 1e-4


def test_training_forward_encodes_once_per_group_with_the_same_logps_and_gradients(setup):
    family, model, adapter, prompts = setup
    torch.manual_seed(2)
    r = HFRolloutEngine(model, adapter).generate(prompts, N, SamplingParams(max_new_tokens=6))
    assert prompt_groups(r.prompts) == [N] * len(prompts.encodings)
    results = {}
    for share in (True, False):
        model.zero_grad()
        seen, handle = _count_rows(_encoder(model))
        try:
            logps, _ = forward_logprobs(model, r.prompts, r.completion_ids, r.completion_mask, share_media=share)
        finally:
            handle.remove()
        (logps * r.completion_mask).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[share] = (logps.detach(), grads, sum(seen))
    (lp_s, g_s, rows_s), (lp_p, g_p, rows_p) = results[True], results[False]
    assert ((lp_s - lp_p).abs() * r.completion_mask).max().item() <= 1e-5
    assert g_s.keys() == g_p.keys()
    for name in g_s:
        assert torch.allclose(g_s[name], g_p[name], rtol=1e-4, atol=1e-6), name
    assert rows_p == N * rows_s > 0


def test_mini_batches_of_whole_groups_keep_the_sharing(setup):
    family, model, adapter, prompts = setup
    r = HFRolloutEngine(model, adapter).generate(prompts, N, SamplingParams(max_new_tokens=4))
    part = select_rows(r, list(range(N, 2 * N)), adapter.pad_token_id)
    assert prompt_groups(part.prompts) == [N]
    full, _ = forward_logprobs(model, r.prompts, r.completion_ids, r.completion_mask)
    sub, _ = forward_logprobs(model, part.prompts, part.completion_ids, part.completion_mask)
    assert ((sub - full[N:2 * N]).abs() * part.completion_mask).max().item() <= 1e-5


@pytest.mark.parametrize("once", [True, False])
def test_trainer_flag_switches_the_sharing(tmp_path, monkeypatch, once):
    import lightrft_mm.models.logprobs as logprobs_module
    import lightrft_mm.rollout.hf as hf_module
    from lightrft_mm.config import load_config
    from lightrft_mm.prepare import prepare_synthetic
    from lightrft_mm.trainer.loop import train

    calls = {"prefill": 0, "features": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            result = fn(*args, **kwargs)
            calls[name] += result is not None
            return result
        return wrapper

    monkeypatch.setattr(hf_module, "prefill_once", counting("prefill", hf_module.prefill_once))
    monkeypatch.setattr(logprobs_module, "group_encoder_outputs",
                        counting("features", logprobs_module.group_encoder_outputs))
    prepare_synthetic("colors", tmp_path / "train", n=4, seed=1)
    train(load_config("recipes/demo/colors.yaml", [
        f"data.train=[{tmp_path / 'train'}]", "data.eval=[]", f"trainer.output_dir={tmp_path / 'run'}",
        "trainer.max_steps=1", "data.batch_size=2", "rollout.n=2", "warmup.steps=0", "logging.progress=false",
        "logging.plot=false", f"trainer.encode_prompts_once={str(once).lower()}"]))
    assert calls == ({"prefill": 1, "features": 1} if once else {"prefill": 0, "features": 0})
