import pytest
import torch

from lightrft_mm.errors import ModelError
from lightrft_mm.models import load_pretrained
from lightrft_mm.models.processing import load_processor
from lightrft_mm.models.tiny import FAMILIES, build_tiny, build_tokenizer
from lightrft_mm.processors import make_adapter
from lightrft_mm.processors.adapter import HFChatAdapter


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava"])
def test_tiny_vlm_is_the_real_architecture_and_sees_the_image(family, image_samples):
    model, processor = build_tiny(family)
    assert type(model).__name__.lower().startswith(family.replace("_", "").replace("25", "2_5")[:5])
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    adapter = HFChatAdapter(processor)
    batch = adapter.encode_prompts(image_samples[:1])
    assert "pixel_values" in batch.media
    with torch.no_grad():
        logits = model(**batch.model_inputs()).logits[0, -1]
        batch.media["pixel_values"] = torch.zeros_like(batch.media["pixel_values"])
        blank = model(**batch.model_inputs()).logits[0, -1]
    # The image reaches the language model: changing it changes the next-token distribution.
    assert not torch.allclose(logits, blank)


def test_same_seed_same_weights_other_seed_other_weights():
    a, _ = build_tiny("qwen2_5_vl", seed=3)
    b, _ = build_tiny("qwen2_5_vl", seed=3)
    c, _ = build_tiny("qwen2_5_vl", seed=4)
    wa, wb, wc = (m.lm_head.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_unknown_family_suggests_the_closest():
    with pytest.raises(ModelError, match="Did you mean 'qwen2_5_vl'"):
        build_tiny("qwen25_vl")
    assert set(FAMILIES) >= {"qwen2_vl", "qwen2_5_vl", "llava"}


def test_bpe_tokenizer_has_vision_tokens_and_round_trips():
    tok = build_tokenizer("bpe")
    for t in ("<|image_pad|>", "<|vision_start|>", "<|im_end|>"):
        assert tok.convert_tokens_to_ids(t) != tok.unk_token_id
    text = "What colour is the image? \\boxed{yellow}"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert len(tok) < 512


def test_qwen_tokenizer_files_give_the_real_vocabulary():
    tok = build_tokenizer("qwen")
    assert len(tok) > 150_000
    assert tok.convert_tokens_to_ids("<|image_pad|>") == 151655  # Qwen2.5-VL's id


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava", "llava_next"])
def test_checkpoint_reloads_with_transformers(family, tmp_path, image_samples):
    model, processor = build_tiny(family)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded, reproc = load_pretrained(tmp_path)
    assert type(reloaded) is type(model)
    batch = make_adapter(model, processor).encode_prompts(image_samples)
    batch2 = make_adapter(reloaded, load_processor(tmp_path)).encode_prompts(image_samples)
    assert torch.equal(batch.input_ids, batch2.input_ids)
    with torch.no_grad():
        assert torch.allclose(model(**batch.model_inputs()).logits, reloaded(**batch2.model_inputs()).logits)


def test_missing_model_folder_names_the_path(tmp_path):
    with pytest.raises(ModelError, match=str(tmp_path / "nope")):
        load_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load_pretrained(tmp_path / "empty")


def test_model_config_reaches_the_factory():
    from lightrft_mm.config import ModelConfig
    from lightrft_mm.models import load_policy

    model, processor = load_policy(ModelConfig(tiny_tokenizer="qwen", dtype="bfloat16"))
    assert len(processor.tokenizer) > 150_000
    assert model.get_input_embeddings().weight.shape[0] == len(processor.tokenizer)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
