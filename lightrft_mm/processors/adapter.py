"""Model adapter: unified Samples -> model tensors, through the model's own HF processor.

One adapter serves every family whose processor takes `text=` and `images=` (Qwen2-VL,
Qwen2.5-VL, LLaVA, text-only LMs). Family differences live in the processor and in one table
below: which outputs are aligned with the tokens (Qwen's `mm_token_type_ids`, extended over
the completion for the M-RoPE index) and which belong to the media (`pixel_values`,
`image_grid_thw`, ...), concatenated across prompts in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from lightrft_mm.errors import MediaError
from lightrft_mm.schema import Sample

# Processor outputs with one entry per token; everything else is per media item. Gemma 3's
# `token_type_ids` (1 = image soft token, for its bidirectional image attention) is one too; the
# text-only families' tokenizers return neither.
TOKEN_ALIGNED = ("mm_token_type_ids", "token_type_ids")


@dataclass
class PromptEncoding:
    """One prompt: its token ids, token-aligned extras [L], media tensors (first dim = item) and
    `raw`: the media as handed to the processor, by kind ("image": PIL images, "video": frame
    arrays, "audio": waveforms), for an engine that processes them itself (vLLM)."""

    input_ids: torch.Tensor
    token_aligned: dict[str, torch.Tensor] = field(default_factory=dict)
    media: dict[str, torch.Tensor] = field(default_factory=dict)
    raw: dict[str, list] = field(default_factory=dict)


@dataclass
class PromptBatch:
    """Left-padded prompts ready for `generate` / forward.

    Attributes:
        input_ids: [B, T] left-padded.
        attention_mask: [B, T].
        token_aligned: name -> [B, T] (zeros at padding).
        media: name -> tensor with the media of all prompts concatenated in order.
        encodings: the per-prompt encodings the batch was built from.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_aligned: dict[str, torch.Tensor]
    media: dict[str, torch.Tensor]
    encodings: list[PromptEncoding]

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                **self.token_aligned, **self.media}

    def repeat(self, n: int, pad_id: int) -> "PromptBatch":
        """Each prompt n times in a row ([B] -> [B * n], group-major)."""
        return collate([e for e in self.encodings for _ in range(n)], pad_id)

    def to(self, device) -> "PromptBatch":
        move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
        return PromptBatch(self.input_ids.to(device), self.attention_mask.to(device),
                           move(self.token_aligned), move(self.media), self.encodings)


class ModelAdapter(Protocol):
    """What the trainer needs from a model family (DESIGN.md §4)."""

    pad_token_id: int
    eos_token_id: int
    modalities: frozenset[str]  # media kinds it takes besides text: "image", "video", "audio"

    def encode_prompts(self, samples: list[Sample]) -> PromptBatch: ...

    def decode(self, token_ids: torch.Tensor) -> list[str]: ...


def collate(encodings: list[PromptEncoding], pad_id: int) -> PromptBatch:
    """Left-pad token ids and token-aligned extras; concatenate media in prompt order."""
    width = max(int(e.input_ids.numel()) for e in encodings)
    ids = torch.full((len(encodings), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encodings), width), dtype=torch.long)
    aligned: dict[str, torch.Tensor] = {}
    media_parts: dict[str, list[torch.Tensor]] = {}
    for row, enc in enumerate(encodings):
        n = int(enc.input_ids.numel())
        ids[row, width - n:] = enc.input_ids
        mask[row, width - n:] = 1
        for key, value in enc.token_aligned.items():
            aligned.setdefault(key, torch.zeros((len(encodings), width), dtype=value.dtype))
            aligned[key][row, width - n:] = value
        for key, value in enc.media.items():
            media_parts.setdefault(key, []).append(value)
    media = {k: torch.cat(v, dim=0) for k, v in media_parts.items()}
    return PromptBatch(ids, mask, aligned, media, list(encodings))


def load_image(path, *, where: str, max_pixels_guard: int = 100_000_000):
    """Decode an image source as RGB, or raise MediaError naming the sample and the file.

    Delegates to `lightrft_mm.processors.image.load_image` (EXIF, mode conversion, bomb guard).
    """
    from lightrft_mm.processors.image import load_image as _load_image

    return _load_image(path, where=where, max_pixels_guard=max_pixels_guard)


def to_hf_messages(sample: Sample, system_prompt: str | None = None) -> list[dict]:
    """Unified messages -> the list-of-dicts form HF chat templates take."""
    messages = []
    if system_prompt and not any(m.role == "system" for m in sample.messages):
        messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    for m in sample.messages:
        parts = [{"type": "text", "text": p.text} if p.type == "text" else {"type": p.type}
                 for p in m.content]
        messages.append({"role": m.role, "content": parts})
    return messages


class HFChatAdapter:
    """Adapter for any HF processor with a chat template that takes `text=` and `images=`.

    Args:
        processor: the model's processor (or a bare tokenizer for text-only models).
        system_prompt: added to samples that carry no system message.
        image, video, audio: the `ImageConfig` / `VideoConfig` / `AudioConfig` sections.
    """

    def __init__(self, processor, *, system_prompt: str | None = None, image=None, video=None, audio=None):
        from lightrft_mm.config import AudioConfig, ImageConfig, VideoConfig

        self.processor = processor
        self.image_cfg = image or ImageConfig()
        self.video_cfg = video or VideoConfig()
        self.audio_cfg = audio or AudioConfig()
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.system_prompt = system_prompt
        self.pad_token_id = self.tokenizer.pad_token_id
        self.eos_token_id = self.tokenizer.eos_token_id
        # Media kinds this adapter can put in a prompt (text always works).
        self.modalities = frozenset({"image"} if getattr(processor, "image_processor", None) else ())
        if self.pad_token_id is None:
            self.pad_token_id = self.eos_token_id

    def encode_one(self, sample: Sample) -> PromptEncoding:
        text = self.processor.apply_chat_template(
            to_hf_messages(sample, self.system_prompt), add_generation_prompt=True, tokenize=False)
        images = [load_image(p.image, where=f"sample {sample.id}",
                             max_pixels_guard=self.image_cfg.max_pixels_guard) for p in sample.media("image")]
        if sample.media("video") or sample.media("audio"):
            raise MediaError(f"sample {sample.id}: video/audio parts need a video/audio adapter, "
                             "which this model's processor does not provide.")
        if images:
            out = self.processor(text=[text], images=images, return_tensors="pt")
        else:
            out = self.tokenizer([text], return_tensors="pt", add_special_tokens=False)
        aligned = {k: out[k][0] for k in TOKEN_ALIGNED if k in out}
        media = {k: v for k, v in out.items()
                 if k not in ("input_ids", "attention_mask") and k not in aligned}
        return PromptEncoding(out["input_ids"][0], aligned, media, {"image": images} if images else {})

    def encode_prompts(self, samples: list[Sample]) -> PromptBatch:
        return collate([self.encode_one(s) for s in samples], self.pad_token_id)

    def decode(self, token_ids: torch.Tensor) -> list[str]:
        return self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)

    def special_ids_to_suppress(self) -> list[int]:
        """Special tokens other than end-of-turn: sampling one (e.g. an image pad) breaks training."""
        ids = set(self.tokenizer.all_special_ids) | {
            i for t, i in self.tokenizer.get_added_vocab().items() if t.startswith("<")}
        return sorted(ids - {self.eos_token_id})

