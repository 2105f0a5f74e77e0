"""Qwen2-Audio adapter: Samples with audio parts -> `input_ids` + `input_features` per audio.

Each audio part is decoded with `lightrft_mm.processors.audio.load_audio` at the feature
extractor's sampling rate, cut to the part's `start` / `end`, and held to the `audio` config
section (`max_seconds`, `on_too_long`) and to the model's audio window (the feature
extractor's `chunk_length`: 30 s for Qwen2-Audio, 2 s for `tiny:qwen2_audio`). The processor
turns it into log-mel `input_features` [audios, mel, frames] padded to the window, with a
`feature_attention_mask` [audios, frames], and expands the chat template's `<|AUDIO|>` into
one token per encoder output frame (25 per second of audio).
"""

from __future__ import annotations

import numpy as np

from lightrft_mm.errors import MediaError
from lightrft_mm.processors.adapter import HFChatAdapter, PromptEncoding
from lightrft_mm.processors.llava import check_placeholders, render_prompt, split_outputs
from lightrft_mm.schema import Part, Sample

# Shorter audio gives at most one audio token; a batch of only such audios would send
# Qwen2-Audio down its legacy (unexpanded) merge path.
MIN_SECONDS = 0.1


class Qwen2AudioAdapter(HFChatAdapter):
    """Adapter for `Qwen2AudioForConditionalGeneration` (model type "qwen2_audio").

    Args:
        processor: a `Qwen2AudioProcessor` (feature extractor + tokenizer + chat template).
        system_prompt, image, video: as for `HFChatAdapter`.
        audio: the `AudioConfig` section (`max_seconds`, `on_too_long`).
    """

    def __init__(self, processor, **kwargs):
        super().__init__(processor, **kwargs)
        self.modalities = frozenset({"audio"})
        extractor = processor.feature_extractor
        self.audio_token = getattr(processor, "audio_token", "<|AUDIO|>")
        self.sampling_rate = int(extractor.sampling_rate)
        self.window_seconds = extractor.n_samples / extractor.sampling_rate

    def encode_one(self, sample: Sample) -> PromptEncoding:
        """Render, check placeholders, decode the audio and run the processor for one sample.

        Raises:
            MediaError: the sample has image/video parts, its `<|AUDIO|>` placeholders do not
                match its audio parts, or an audio part cannot be decoded, is too short, or is
                too long under `audio.on_too_long=fail`; the message names the sample.
        """
        if sample.media("image") or sample.media("video"):
            raise MediaError(f"sample {sample.id}: Qwen2-Audio takes text and audio parts only; this "
                             "sample has image/video parts. Fix: use a vision-language model for them, "
                             "or drop the parts.")
        text = render_prompt(self, sample)
        check_placeholders(sample, text, self.audio_token, "audio")
        audios = [self.load(part, sample) for part in sample.media("audio")]
        if not audios:
            return split_outputs(self.tokenizer([text], return_tensors="pt", add_special_tokens=False))
        out = self.processor(text=[text], audio=audios, sampling_rate=self.sampling_rate, return_tensors="pt")
        out.pop("num_audio_tokens", None)
        return split_outputs(out, {"audio": audios})

    def load(self, part: Part, sample: Sample) -> np.ndarray:
        """Decode one audio part: mono float32 at the model's rate, within both length limits."""
        return load_for_model(part.audio, part, f"sample {sample.id}", audio_cfg=self.audio_cfg,
                              sampling_rate=self.sampling_rate, window_seconds=self.window_seconds)


def load_for_model(source, part: Part, where: str, *, audio_cfg, sampling_rate: int,
                   window_seconds: float) -> np.ndarray:
    """Decode audio (a file, or a video's track) for an audio model (Qwen2-Audio, Qwen2.5-Omni).

    Args:
        source: the audio (or video) file.
        part: the sample's part, for its start / end.
        where: names the sample in errors.
        audio_cfg: the `AudioConfig` section (`max_seconds`, `on_too_long`).
        sampling_rate, window_seconds: the feature extractor's rate and window (`chunk_length`).

    Returns:
        Mono float32 at `sampling_rate`, within audio.max_seconds and the window; MediaError when
        it is shorter than MIN_SECONDS.
    """
    from lightrft_mm.processors.audio import load_audio

    context = where
    if window_seconds < audio_cfg.max_seconds:
        # The model cannot hear past its window: the limit is the window, with the fix for it.
        context = (f"{where} (the model hears at most {window_seconds:g} s, its feature extractor's "
                   f"chunk_length; audio.max_seconds={audio_cfg.max_seconds:g} is above that, so "
                   f"{window_seconds:g} s applies)")
    audio = load_audio(source, sampling_rate=sampling_rate, start=part.start, end=part.end,
                       max_seconds=min(audio_cfg.max_seconds, window_seconds), on_too_long=audio_cfg.on_too_long,
                       where=context)
    seconds = len(audio) / sampling_rate
    if seconds < MIN_SECONDS:
        cut = " after start/end" if part.start is not None or part.end is not None else ""
        raise MediaError(f"{where}: the audio of {source} is {seconds:.3f} s long{cut}; the model needs at least "
                         f"{MIN_SECONDS:g} s. Fix: widen start/end or drop the part.")
    return audio


__all__ = ["Qwen2AudioAdapter", "MIN_SECONDS", "load_for_model"]
