"""Qwen2-VL / Qwen2.5-VL adapter: text, images, several images and videos in one batch.

transformers' Qwen video processor needs torchvision, so this adapter builds the prompt the
way `Qwen2VLProcessor` does, by hand: the chat template writes one
`<|vision_start|><|image_pad|><|vision_end|>` (or `<|video_pad|>`) per media part; each pad is
expanded to the part's token count (grid t*h*w / merge_size^2); images go through the model's
image processor, videos through `lightrft_mm.processors.video`. The prompt carries
`mm_token_type_ids` (0 text, 1 image, 2 video) and, for Qwen2.5-VL, `second_per_grid_ts`
(temporal_patch_size / sampled fps, one per video), so generation and the training forward
derive the same M-RoPE positions.

Every media tensor stays in its prompt's `PromptEncoding`: `collate` concatenates each key
along dim 0 in prompt order, which is the order the model consumes images, videos and
`second_per_grid_ts` in.
"""

from __future__ import annotations

import re

import torch

from lightrft_mm.errors import MediaError
from lightrft_mm.processors.adapter import HFChatAdapter, PromptEncoding, load_image, to_hf_messages
from lightrft_mm.processors.video import default_video_pixels, load_video, qwen_video_inputs
from lightrft_mm.schema import Part, Sample

IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
_PADS = re.compile(re.escape(IMAGE_PAD) + "|" + re.escape(VIDEO_PAD))


class QwenVLAdapter(HFChatAdapter):
    """Adapter of the Qwen2-VL family (DESIGN.md §4 `ModelAdapter`).

    Args:
        processor: a Qwen2-VL processor (with `image_processor`, `tokenizer`, chat template).
        system_prompt: added to samples that carry no system message.
        image, video, audio: the config sections; `video` gives the decoder backend and the
            default fps / max_frames (a video part's own `fps` / `max_frames` win).
        model_type: "qwen2_vl" or "qwen2_5_vl"; None = "qwen2_5_vl" when the processor lists
            `second_per_grid_ts` among its inputs, else the class default.
    """

    model_type = "qwen2_vl"
    family_name = "Qwen2-VL"  # in error messages

    def __init__(self, processor, *, system_prompt: str | None = None, image=None, video=None,
                 audio=None, model_type: str | None = None):
        super().__init__(processor, system_prompt=system_prompt, image=image, video=video, audio=audio)
        self.modalities = frozenset({"image", "video"})
        if model_type is None and "second_per_grid_ts" in getattr(processor, "model_input_names", ()):
            model_type = "qwen2_5_vl"
        self.model_type = model_type or type(self).model_type
        self.image_processor = processor.image_processor
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        self.video_token_id = self.tokenizer.convert_tokens_to_ids(VIDEO_PAD)

    @property
    def sends_second_per_grid(self) -> bool:
        """Qwen2.5-VL spaces video time positions by seconds; Qwen2-VL's generate rejects the key."""
        return self.model_type == "qwen2_5_vl"

    def encode_one(self, sample: Sample) -> PromptEncoding:
        """One Sample -> token ids, `mm_token_type_ids` and its media tensors.

        Raises:
            MediaError: a media file cannot be read, the sample holds audio, or the
                placeholders of the prompt do not match its media parts (names the sample).
        """
        where = f"sample {sample.id}"
        if sample.media("audio"):
            raise MediaError(f"{where}: audio parts need an audio model (e.g. tiny:qwen2_audio or "
                             f"tiny:qwen2_5_omni); {self.family_name} models take text, images and videos.")
        text = self.processor.apply_chat_template(
            to_hf_messages(sample, self.system_prompt), add_generation_prompt=True, tokenize=False)
        media: dict[str, torch.Tensor] = {}
        raw: dict[str, list] = {}
        image_tokens = self._images(sample, where, media, raw)
        videos = self._videos(sample, where, media, raw)
        text = self._expand(text, image_tokens, [v for v, _ in videos], where)
        input_ids = self.tokenizer([text], add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        types = torch.zeros_like(input_ids)
        types[input_ids == self.image_token_id] = 1
        types[input_ids == self.video_token_id] = 2
        for kind, code, counts in (("image", 1, image_tokens), ("video", 2, [n for _, n in videos])):
            if int((types == code).sum()) != sum(counts):
                raise MediaError(f"{where}: the tokenized prompt holds {int((types == code).sum())} {kind} "
                                 f"tokens where its {len(counts)} {kind}(s) need {sum(counts)}. Fix: keep "
                                 f"'{IMAGE_PAD}' / '{VIDEO_PAD}' out of the text and the chat template.")
        return PromptEncoding(input_ids, {"mm_token_type_ids": types}, media, raw)

    def _images(self, sample: Sample, where: str, media: dict, raw: dict) -> list[int]:
        guard = self.image_cfg.max_pixels_guard
        images = [load_image(p.image, where=where, max_pixels_guard=guard) for p in sample.media("image")]
        if not images:
            return []
        raw["image"] = images
        out = self.image_processor(images=images, return_tensors="pt")
        media["pixel_values"] = out["pixel_values"]
        media["image_grid_thw"] = out["image_grid_thw"]
        merge = self.image_processor.merge_size ** 2
        return [int(g.prod()) // merge for g in out["image_grid_thw"]]

    def _videos(self, sample: Sample, where: str, media: dict, raw: dict) -> list[tuple[str, int]]:
        """Video tensors into `media`; returns each video's (text replacing its pad, video tokens)."""
        parts = sample.media("video")
        if not parts:
            return []
        pixels, grids, seconds = [], [], []
        for part in parts:
            clip = self.load_clip(part, where)
            raw.setdefault("video", []).append(clip.frames)
            out = qwen_video_inputs(clip.frames, self.image_processor, **self.video_pixels())
            pixels.append(out["pixel_values_videos"])
            grids.append(out["video_grid_thw"])
            seconds.append(self.image_processor.temporal_patch_size / clip.sample_fps)
        media["pixel_values_videos"] = torch.cat(pixels)
        media["video_grid_thw"] = torch.cat(grids)
        if self.sends_second_per_grid:
            media["second_per_grid_ts"] = torch.tensor(seconds, dtype=torch.float32)
        merge = self.image_processor.merge_size ** 2
        return [(VIDEO_PAD * (int(g.prod()) // merge), int(g.prod()) // merge) for g in media["video_grid_thw"]]

    def load_clip(self, part: Part, where: str):
        """Decode a video part with its own fps / max_frames / start / end, else the config's."""
        return load_video(part.video, fps=part.fps or self.video_cfg.fps,
                          max_frames=part.max_frames or self.video_cfg.max_frames,
                          start=part.start, end=part.end, backend=self.video_cfg.backend,
                          temporal_patch=self.image_processor.temporal_patch_size, where=where)

    def video_pixels(self) -> dict:
        """qwen-vl-utils' per-frame and whole-video pixel budgets (on top of the processor's)."""
        max_pixels, total_pixels = default_video_pixels(self.image_processor)
        return {"max_pixels": max_pixels, "total_pixels": total_pixels}

    @staticmethod
    def _expand(text: str, image_tokens: list[int], video_texts: list[str], where: str) -> str:
        """Replace the i-th image pad of the template by that image's pads, the i-th video pad by
        that video's text (its pads; Qwen3-VL's also carry timestamps)."""
        found = _PADS.findall(text)
        n_images, n_videos = found.count(IMAGE_PAD), found.count(VIDEO_PAD)
        if (n_images, n_videos) != (len(image_tokens), len(video_texts)):
            raise MediaError(f"{where}: the prompt has {n_images} image and {n_videos} video placeholder(s) "
                             f"but the sample has {len(image_tokens)} image and {len(video_texts)} video "
                             f"part(s). Fix: remove literal '{IMAGE_PAD}' / '{VIDEO_PAD}' from the text, "
                             "or use a chat template that writes one placeholder per media part.")
        images, videos = iter(image_tokens), iter(video_texts)
        return _PADS.sub(lambda m: IMAGE_PAD * next(images) if m.group(0) == IMAGE_PAD else next(videos), text)


class Qwen2_5_VLAdapter(QwenVLAdapter):
    """Qwen2.5-VL: as Qwen2-VL, plus `second_per_grid_ts` for the time-aligned video positions."""

    model_type = "qwen2_5_vl"


__all__ = ["QwenVLAdapter", "Qwen2_5_VLAdapter"]
