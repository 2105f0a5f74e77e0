"""Qwen2.5-Omni thinker adapter: text, images, videos, audio, and videos with their audio track.

The prompt is built by hand, as `Qwen2_5OmniProcessor` builds it (its video processor needs
torchvision): the chat template writes `<|vision_bos|><|IMAGE|><|vision_eos|>`,
`<|vision_bos|><|VIDEO|><|vision_eos|>` and `<|audio_bos|><|AUDIO|><|audio_eos|>` per part; each
placeholder is expanded to its item's token count. Images go through the model's image
processor, videos through `lightrft_mm.processors.video` (with `video_second_per_grid` =
temporal_patch_size / sampled fps), audio through the feature extractor (log-mel
`input_features` padded to its window, `feature_attention_mask`), as for Qwen2-Audio.

With `video.use_audio` every video part also gives its audio track (decoded from the video file,
cut to the part's start / end): `<|VIDEO|>` becomes `<|audio_bos|>`, then the video tokens and
the audio tokens interleaved in chunks of `seconds_per_chunk` (2 s; the processor's
`replace_video_with_audio_token`), then `<|audio_eos|>`. The thinker positions them with its
`use_audio_in_video` rule (`get_rope_index`): that flag is one per forward, so every video
prompt carries it as `use_audio_in_video` in its media, a bool tensor that reads as one bool for
the whole batch (`AudioInVideo`), and a batch mixing videos with and without audio is refused.

Audio features are in prompt order: the standalone audio parts and the videos' audio tracks in
the order their tokens appear, which is the order the model consumes them in.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from transformers import Qwen2_5OmniProcessor
from transformers.processing_utils import ProcessorMixin

from lightrft_mm.errors import MediaError, ModelError
from lightrft_mm.processors.adapter import HFChatAdapter, PromptEncoding, load_image, to_hf_messages
from lightrft_mm.processors.qwen_audio import load_for_model
from lightrft_mm.processors.qwen_vl import QwenVLAdapter
from lightrft_mm.processors.video import qwen_video_inputs
from lightrft_mm.schema import Part, Sample

IMAGE, VIDEO, AUDIO = "<|IMAGE|>", "<|VIDEO|>", "<|AUDIO|>"
AUDIO_BOS, AUDIO_EOS = "<|audio_bos|>", "<|audio_eos|>"
VISION_BOS, VISION_EOS = "<|vision_bos|>", "<|vision_eos|>"
_PLACEHOLDERS = re.compile("|".join(re.escape(t) for t in (IMAGE, VIDEO, AUDIO)))
_KIND = {IMAGE: "image", VIDEO: "video", AUDIO: "audio"}


class AudioInVideo(torch.Tensor):
    """Per-prompt `use_audio_in_video` flags, [videos' prompts] bool. `collate` concatenates them
    like any media tensor; the thinker reads the concatenation as one bool (`bool(flags)`), which
    is the flag's value when every video prompt of the batch agrees."""

    def __bool__(self) -> bool:
        values = {bool(v) for v in self.reshape(-1).tolist()}
        if len(values) > 1:
            raise ModelError("This batch mixes videos with and without their audio track; Qwen2.5-Omni's thinker "
                             "positions them with one use_audio_in_video flag per forward. Fix: encode every "
                             "video with the same video.use_audio.")
        return values == {True}


def chunk_bounds(indices: torch.Tensor, tokens_per_chunk: int) -> list[tuple[int, int]]:
    """[start, end) slices of monotonically increasing `indices` whose values fall in successive
    windows of `tokens_per_chunk` (the thinker's `get_chunked_index`)."""
    bounds, start, chunk = [], 0, 1
    for i, value in enumerate(indices.tolist()):
        if value >= chunk * tokens_per_chunk:
            bounds.append((start, i))
            start, chunk = i, chunk + 1
    bounds.append((start, len(indices)))
    return bounds


def audio_tokens(feature_frames: int) -> int:
    """Audio tokens of a clip of `feature_frames` mel frames (the encoder's two halvings)."""
    return ((feature_frames - 1) // 2 + 1 - 2) // 2 + 1


class Qwen2_5OmniNoVideoProcessor(Qwen2_5OmniProcessor):
    """`Qwen2_5OmniProcessor` with image processor, feature extractor and tokenizer, without the
    video processor (torchvision); saved as the stock class."""

    def __init__(self, image_processor=None, feature_extractor=None, tokenizer=None, chat_template=None, **kwargs):
        ids = tokenizer.convert_tokens_to_ids
        self.image_token, self.video_token, self.audio_token = IMAGE, VIDEO, AUDIO
        self.image_token_id, self.video_token_id, self.audio_token_id = ids(IMAGE), ids(VIDEO), ids(AUDIO)
        self.vision_bos_token, self.vision_eos_token = VISION_BOS, VISION_EOS
        self.audio_bos_token, self.audio_eos_token = AUDIO_BOS, AUDIO_EOS
        ProcessorMixin.__init__(self, image_processor, feature_extractor, tokenizer, chat_template=chat_template)

    @property
    def model_input_names(self):
        return list(dict.fromkeys(self.tokenizer.model_input_names + self.feature_extractor.model_input_names
                                  + self.image_processor.model_input_names
                                  + ["feature_attention_mask", "video_second_per_grid"]))

    def to_dict(self):
        return {**super().to_dict(), "processor_class": "Qwen2_5OmniProcessor"}


class QwenOmniAdapter(HFChatAdapter):
    """Adapter of `Qwen2_5OmniThinkerForConditionalGeneration` (DESIGN.md §4 `ModelAdapter`).

    Args:
        processor: a Qwen2.5-Omni processor (image processor, feature extractor, tokenizer,
            chat template); its video processor, if any, is not used.
        system_prompt: added to samples that carry no system message.
        image, video, audio: the config sections (`video.use_audio`: videos with their audio
            track; `audio.max_seconds` / `on_too_long`, bounded by the feature extractor's window).
    """

    def __init__(self, processor, **kwargs):
        super().__init__(processor, **kwargs)
        self.modalities = frozenset({"image", "video", "audio"})
        self.image_processor = processor.image_processor
        self.feature_extractor = processor.feature_extractor
        self.sampling_rate = int(self.feature_extractor.sampling_rate)
        self.window_seconds = self.feature_extractor.n_samples / self.sampling_rate
        self.use_audio = bool(self.video_cfg.use_audio)
        self.ids = {t: self.tokenizer.convert_tokens_to_ids(t) for t in (IMAGE, VIDEO, AUDIO)}
        # The thinker config's defaults (the processor keeps the same two numbers).
        self.position_id_per_seconds = getattr(processor, "position_id_per_seconds", 25)
        self.seconds_per_chunk = getattr(processor, "seconds_per_chunk", 2.0)

    def encode_one(self, sample: Sample) -> PromptEncoding:
        """One Sample -> token ids and its media tensors (images, videos, audio features, in order).

        Raises:
            MediaError: a media file cannot be read, an audio is too short, a video has no audio
                track under `video.use_audio`, or the placeholders of the prompt do not match the
                sample's media parts; the message names the sample.
        """
        where = f"sample {sample.id}"
        text = self.processor.apply_chat_template(
            to_hf_messages(sample, self.system_prompt), add_generation_prompt=True, tokenize=False)
        parts = sample.media()
        found = [_KIND[m] for m in _PLACEHOLDERS.findall(text)]
        if found != [p.type for p in parts]:
            raise MediaError(f"{where}: the prompt's media placeholders ({', '.join(found) or 'none'}) do not match "
                             f"its media parts ({', '.join(p.type for p in parts) or 'none'}). Fix: remove literal "
                             f"'{IMAGE}' / '{VIDEO}' / '{AUDIO}' from the text, or use a chat template that writes "
                             "one placeholder per media part.")
        media: dict[str, torch.Tensor] = {}
        raw: dict[str, list] = {}
        replacements = self._images(sample, where, media, raw)
        audios = []  # (index of the part, waveform) in part order
        for i, part in enumerate(parts):
            if part.type == "audio":
                audios.append((i, self.load_audio(part.audio, part, where)))
                raw.setdefault("audio", []).append(audios[-1][1])
        videos = [(i, p) for i, p in enumerate(parts) if p.type == "video"]
        tracks = {}
        if videos and self.use_audio:
            tracks = {i: self._track(p, where) for i, p in videos}
            raw["video_audio"] = [tracks[i] for i, _ in videos]
        lengths = self._audio_features(sorted(audios + list(tracks.items()), key=lambda x: x[0]), media)
        replacements.update({i: AUDIO * audio_tokens(lengths[i]) for i, _ in audios})
        replacements.update(self._videos(videos, lengths, where, media, raw))
        order = iter(range(len(parts)))
        text = _PLACEHOLDERS.sub(lambda m: replacements[next(order)], text)
        input_ids = self.tokenizer([text], add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        self._check_counts(input_ids, text, where)
        return PromptEncoding(input_ids, {}, media, raw)

    def _images(self, sample: Sample, where: str, media: dict, raw: dict) -> dict[int, str]:
        """Image inputs; returns {part index: the image's tokens}."""
        indices = [i for i, p in enumerate(sample.media()) if p.type == "image"]
        if not indices:
            return {}
        guard = self.image_cfg.max_pixels_guard
        images = [load_image(p.image, where=where, max_pixels_guard=guard) for p in sample.media("image")]
        raw["image"] = images
        out = self.image_processor(images=images, return_tensors="pt")
        media["pixel_values"], media["image_grid_thw"] = out["pixel_values"], out["image_grid_thw"]
        merge = self.image_processor.merge_size ** 2
        return {i: IMAGE * (int(g.prod()) // merge) for i, g in zip(indices, out["image_grid_thw"])}

    def _audio_features(self, audios: list[tuple[int, np.ndarray]], media: dict) -> dict[int, int]:
        """Log-mel features of the waveforms (in prompt order); returns {part index: feature frames}."""
        if not audios:
            return {}
        out = self.feature_extractor([a for _, a in audios], sampling_rate=self.sampling_rate, padding="max_length",
                                     return_attention_mask=True, return_tensors="pt")
        media["input_features"] = out["input_features"]
        media["feature_attention_mask"] = out["attention_mask"]
        return {i: int(n) for (i, _), n in zip(audios, out["attention_mask"].sum(-1))}

    def _videos(self, videos: list[tuple[int, Part]], lengths: dict[int, int], where: str, media: dict,
                raw: dict) -> dict[int, str]:
        """Video inputs; returns {part index: the video's tokens, its audio interleaved if used}."""
        if not videos:
            return {}
        pixels, grids, seconds, out_text = [], [], [], {}
        merge = self.image_processor.merge_size
        for i, part in videos:
            clip = self.load_clip(part, where)
            raw.setdefault("video", []).append(clip.frames)
            out = qwen_video_inputs(clip.frames, self.image_processor, **self.video_pixels())
            pixels.append(out["pixel_values_videos"])
            grids.append(out["video_grid_thw"])
            seconds.append(self.image_processor.temporal_patch_size / clip.sample_fps)
            t, h, w = (int(x) for x in out["video_grid_thw"][0])
            if i in lengths:
                out_text[i] = self._interleave(t, h // merge, w // merge, seconds[-1], audio_tokens(lengths[i]))
            else:
                out_text[i] = VIDEO * (t * h * w // merge ** 2)
        media["pixel_values_videos"] = torch.cat(pixels)
        media["video_grid_thw"] = torch.cat(grids)
        media["video_second_per_grid"] = torch.tensor(seconds, dtype=torch.float32)
        media["use_audio_in_video"] = torch.full((len(videos),), self.use_audio, dtype=torch.bool).as_subclass(
            AudioInVideo)
        return out_text

    def _interleave(self, grid_t: int, h: int, w: int, second_per_grid: float, n_audio: int) -> str:
        """The video's tokens and its audio's tokens in time chunks, as the thinker positions them."""
        # The temporal position of each video token, computed as `get_rope_index` does (float32, floored).
        t_index = (torch.arange(grid_t) * torch.tensor(second_per_grid, dtype=torch.float32)
                   * self.position_id_per_seconds).long()
        video_index = t_index.view(-1, 1).expand(-1, h * w).flatten()
        per_chunk = int(self.position_id_per_seconds * self.seconds_per_chunk)
        video_chunks = chunk_bounds(video_index, per_chunk)
        audio_chunks = chunk_bounds(torch.arange(n_audio), per_chunk)
        text = AUDIO_BOS
        for j in range(max(len(video_chunks), len(audio_chunks))):
            if j < len(video_chunks):
                text += VIDEO * (video_chunks[j][1] - video_chunks[j][0])
            if j < len(audio_chunks):
                text += AUDIO * (audio_chunks[j][1] - audio_chunks[j][0])
        return text + AUDIO_EOS

    def _check_counts(self, input_ids: torch.Tensor, text: str, where: str) -> None:
        for token, token_id in self.ids.items():
            want = text.count(token)
            if int((input_ids == token_id).sum()) != want:
                raise MediaError(f"{where}: the tokenized prompt holds {int((input_ids == token_id).sum())} "
                                 f"'{token}' tokens where its media need {want}. Fix: keep '{token}' out of the "
                                 "text and the chat template.")

    # Video parts are decoded, and their pixel budgets set, as for Qwen2-VL / Qwen2.5-VL.
    load_clip = QwenVLAdapter.load_clip
    video_pixels = QwenVLAdapter.video_pixels

    def _track(self, part: Part, where: str) -> np.ndarray:
        """The audio track of a video part (video.use_audio), over the part's start / end."""
        try:
            return self.load_audio(part.video, part, where)
        except MediaError as e:
            if "no audio stream" not in str(e):
                raise
            raise MediaError(f"{where}: video {part.video} has no audio track, and video.use_audio=true gives "
                             "every video's audio to the model. Fix: set video.use_audio=false, or use videos "
                             "with sound.") from e

    def load_audio(self, source, part: Part, where: str) -> np.ndarray:
        """Decode audio (a file, or a video's track) as Qwen2-Audio's adapter does."""
        return load_for_model(source, part, where, audio_cfg=self.audio_cfg, sampling_rate=self.sampling_rate,
                              window_seconds=self.window_seconds)


__all__ = ["AudioInVideo", "Qwen2_5OmniNoVideoProcessor", "QwenOmniAdapter", "audio_tokens", "chunk_bounds"]
