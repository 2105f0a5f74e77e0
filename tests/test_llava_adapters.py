"""LLaVA-1.5 and LLaVA-NeXT adapters: mixed batches, any-res tiles, parity, training, checkpoints."""

import numpy as np
import pytest
import torch

from lightrft_mm.config import ImageConfig
from lightrft_mm.errors import MediaError
from lightrft_mm.models.logprobs import forward_logprobs
from lightrft_mm.models.tiny import build_tiny
from lightrft_mm.processors import make_adapter
from lightrft_mm.processors.llava import LlavaAdapter, LlavaNextAdapter
from lightrft_mm.rollout.hf import HFRolloutEngine, SamplingParams
from lightrft_mm.schema import Sample

FAMILIES = ["llava", "llava_next"]
# CLIP's post-layernorm only feeds its pooled output; LLaVA reads the last hidden states
# before it (vision_feature_layer=-1), so those two parameters never get a gradient.
UNUSED = {"model.vision_tower.post_layernorm.weight", "model.vision_tower.post_layernorm.bias"}


@pytest.fixture(scope="module")
def shaped_images(tmp_path_factory):
    """Square, wide, tall and small random PNGs: any-res gives them different tile counts."""
    from PIL import Image

    root = tmp_path_factory.mktemp("llava_images")
    rng = np.random.default_rng(1)
    paths = {}
    for name, (w, h) in {"square": (84, 84), "wide": (140, 56), "tall": (56, 140), "small": (30, 30)}.items():
        paths[name] = str(root / f"{name}.png")
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(paths[name])
    return paths


def _sample(sid, *parts, system=None):
    content = [{"type": "image", "image": p} if p.endswith(".png") else {"type": "text", "text": p} for p in parts]
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    return Sample.from_dict({"id": sid, "messages": messages, "answer": "red", "choices": ["red", "blue"]})


@pytest.fixture(scope="module")
def mixed_samples(shaped_images):
    """One image, text only, two images (wide + tall), a small image with a system prompt."""
    return [
        _sample("one", shaped_images["square"], "What colour?"),
        _sample("text", "How many shapes are in the image? Count them."),
        _sample("two", shaped_images["wide"], "and", shaped_images["tall"]),
        _sample("sys", "Describe", shaped_images["small"], system="You are a helpful assistant."),
    ]


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    torch.manual_seed(0)
    model, processor = build_tiny(request.param)
    return request.param, model, processor


def test_make_adapter_picks_the_llava_adapters():
    for family, cls in (("llava", LlavaAdapter), ("llava_next", LlavaNextAdapter)):
        model, processor = build_tiny(family)
        assert type(make_adapter(model, processor)) is cls


def test_any_res_tiles_pad_across_prompts_and_padding_is_never_read(shaped_images):
    torch.manual_seed(0)
    model, processor = build_tiny("llava_next")
    adapter = make_adapter(model, processor)
    # Called one image at a time, the HF processor gives each image its own tile count.
    tiles = {name: processor(text=["<image>"], images=[load(path)], return_tensors="pt")["pixel_values"].shape[1]
             for name, path in shaped_images.items()}
    assert tiles["square"] > tiles["wide"] > 1 and len(set(tiles.values())) > 1
    samples = [_sample("w", shaped_images["wide"], "x"), _sample("s", shaped_images["square"], "y"),
               _sample("t", "text only")]
    batch = adapter.encode_prompts(samples)
    pixels, sizes = batch.media["pixel_values"], batch.media["image_sizes"]
    assert pixels.shape[:2] == (2, adapter.max_tiles(tuple(pixels.shape[-2:]))) == (2, 5)
    assert sizes.tolist() == [[56, 140], [84, 84]]
    # The wide image's padded tiles are zeros, and the model ignores whatever they hold.
    assert not pixels[0, tiles["wide"]:].any()
    with torch.no_grad():
        logits = model(**batch.model_inputs()).logits
        batch.media["pixel_values"][0, tiles["wide"]:] = 5.0
        assert torch.equal(model(**batch.model_inputs()).logits, logits)
        batch.media["pixel_values"][0, 0] = 5.0
        assert not torch.allclose(model(**batch.model_inputs()).logits, logits)


def load(path):
    from PIL import Image

    return Image.open(path).convert("RGB")


def _rollouts(model, processor, samples):
    adapter = make_adapter(model, processor)
    prompts = adapter.encode_prompts(samples)
    assert (prompts.attention_mask == 0).any()  # mixed lengths: the batch is left-padded
    torch.manual_seed(0)
    rollouts = HFRolloutEngine(model, adapter).generate(prompts, 2, SamplingParams(max_new_tokens=10, temperature=0.9))
    return adapter, rollouts


def test_generation_and_training_logps_agree(family_model, mixed_samples):
    family, model, processor = family_model
    _, r = _rollouts(model, processor, mixed_samples)
    assert r.prompts.media["pixel_values"].shape[0] == 2 * 4  # 4 images per copy of the batch, n=2
    logps, _ = forward_logprobs(model, r.prompts, r.completion_ids, r.completion_mask, temperature=0.9)
    diff = ((logps - r.logps).abs() * r.completion_mask).max().item()
    assert diff <= 1e-4, f"{family}: max |logp_gen - logp_train| = {diff}"
    assert r.completion_mask.sum() > 20


def test_one_training_step_changes_every_trainable_parameter(family_model, mixed_samples):
    import copy

    family, model, processor = family_model
    model = copy.deepcopy(model)
    _, r = _rollouts(model, processor, mixed_samples)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    logps, _ = forward_logprobs(model, r.prompts, r.completion_ids, r.completion_mask, temperature=0.9)
    advantages = torch.linspace(-1, 1, logps.shape[0])[:, None]
    (-(logps * advantages * r.completion_mask).sum() / r.completion_mask.sum()).backward()
    no_grad = {n for n, p in model.named_parameters() if p.grad is None}
    assert no_grad == UNUSED
    optimizer.step()
    unchanged = [n for n, p in model.named_parameters() if n not in UNUSED and torch.equal(p, before[n])]
    assert not unchanged, f"{family}: parameters a step left unchanged: {unchanged}"


@pytest.mark.parametrize("family", FAMILIES)
def test_placeholder_mismatch_names_the_sample(family, shaped_images):
    model, processor = build_tiny(family)
    adapter = make_adapter(model, processor)
    literal = _sample("bad-17", shaped_images["square"], "Look at <image> here")
    with pytest.raises(MediaError, match=r"sample bad-17: .*2 '<image>' placeholder\(s\).*1 image part"):
        adapter.encode_one(literal)
    with pytest.raises(MediaError, match="sample text-3"):
        adapter.encode_one(_sample("text-3", "no picture, yet <image>"))
    audio = Sample.from_dict({"id": "aud-1", "messages": [{"role": "user", "content": [
        {"type": "audio", "audio": "x.wav"}, {"type": "text", "text": "hi"}]}]})
    with pytest.raises(MediaError, match="sample aud-1: .*video/audio parts"):
        adapter.encode_one(audio)


def test_image_pixel_guard_from_the_config_is_applied(shaped_images):
    model, processor = build_tiny("llava_next")
    sample = _sample("big-1", shaped_images["square"], "x")
    assert make_adapter(model, processor, image=ImageConfig(max_pixels_guard=84 * 84)).encode_one(sample)
    with pytest.raises(MediaError, match="big-1"):
        make_adapter(model, processor, image=ImageConfig(max_pixels_guard=84 * 84 - 1)).encode_one(sample)


def test_llava_next_checkpoint_reloads_with_equal_logits(tmp_path, mixed_samples):
    from lightrft_mm.models import load_pretrained

    model, processor = build_tiny("llava_next", seed=5)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded, reprocessor = load_pretrained(tmp_path)
    assert type(reloaded) is type(model)
    batch = make_adapter(model, processor).encode_prompts(mixed_samples)
    batch2 = make_adapter(reloaded, reprocessor).encode_prompts(mixed_samples)
    assert torch.equal(batch.input_ids, batch2.input_ids)
    assert torch.equal(batch.media["pixel_values"], batch2.media["pixel_values"])
    with torch.no_grad():
        assert torch.equal(model(**batch.model_inputs()).logits, reloaded(**batch2.model_inputs()).logits)
