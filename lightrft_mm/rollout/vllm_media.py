"""The media of a rollout prompt on its way to a vLLM engine, and the engine's Qwen video processor.

The trainer's adapter has already decoded, sampled and sized every media item; the engine must
see the same items, so that vLLM's expansion of the prompt and its pixel values / features equal
the trainer's:

- images: the PIL images the processor was given, as PNG (lossless);
- videos (Qwen2-VL / Qwen2.5-VL / Qwen2.5-Omni / Qwen3-VL): the frames the adapter sampled,
  resized to the grid the adapter's processor chose (`video_grid_thw` x patch size, with the same
  PIL resampler), as PNG, with the sampled fps when the family uses it (Qwen2.5-VL's
  `second_per_grid_ts` and Qwen2.5-Omni's `video_second_per_grid` are temporal_patch / fps;
  Qwen3-VL gets frame indices and an fps from which vLLM writes the trainer's own `<t seconds>`
  text). vLLM gets them with `do_sample_frames=False`, and `QwenVideoProcessor` (installed into
  the engine's Qwen processors by `vllm_shims`) turns them into patches with the trainer's own
  code (`processors.video.qwen_video_inputs`): frames already at the grid are not resampled
  again, so the values are the trainer's bit for bit;
- audio (Qwen2-Audio, Qwen2.5-Omni): the mono float32 waveform at the feature extractor's rate, raw.

The prompt is the trainer's token ids with each media span as vLLM writes it before expanding
(`engine_prompt`: one placeholder per run; InternVL's `<img>...</img>` and Gemma 3's
newline-wrapped image folded to their one token; a Qwen3-VL video to one pad).

`prompt_media` and `engine_prompt` run in the trainer; `engine_media` and `QwenVideoProcessor`
run in vLLM's environment (numpy, PIL and torch only, plus `processors.video`).
"""

from __future__ import annotations

import base64
import io

import numpy as np

# vLLM 0.32 takes Qwen2-Audio features of exactly 3000 frames (a 30 s Whisper window): its
# Qwen2AudioFeatureInputs schema is TensorShape("na", "nmb", 3000)
# (vllm/model_executor/models/qwen2_audio.py).
VLLM_AUDIO_FRAMES = 3000
# Families whose vLLM processor would take videos that the trainer's adapter does not build
# (Qwen3.5's and InternVL's take none; their video processors need torchvision): the engine
# allows them no video (`vllm_server`), and the client refuses video prompts for them.
NO_VIDEO_FAMILIES = ("qwen3_5", "internvl")
# Families whose processor reads the videos' fps from the request's processor keywords (one for
# the prompt: Qwen2_5OmniProcessor's `fps`), not from each video's metadata.
FPS_KWARG_FAMILIES = ("qwen2_5_omni", "qwen2_5_omni_thinker")


def audio_window_problem(nb_max_frames: int, where: str) -> str | None:
    """Why vLLM cannot serve a Qwen2-Audio model with this feature window, or None."""
    if nb_max_frames == VLLM_AUDIO_FRAMES:
        return None
    return (f"rollout.engine=vllm: {where} has a {nb_max_frames / 100:g} s audio window ({nb_max_frames} feature "
            f"frames); vLLM 0.32's Qwen2-Audio takes only {VLLM_AUDIO_FRAMES} (30 s, the released models' "
            "window: Qwen2AudioFeatureInputs in vllm/model_executor/models/qwen2_audio.py). "
            "Fix: rollout.engine=hf for this model.")


# -- trainer side ------------------------------------------------------------------------------
def png(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def prompt_media(enc, adapter, *, video_times: list[list[float]] | None = None) -> dict:
    """The JSON media of one `PromptEncoding` (see the module docstring). Every kind in
    `enc.raw` must be one the engine takes (the caller checks). video_times: the seconds of each
    video's temporal patches as the prompt writes them (Qwen3-VL, `qwen3_video_prompt`)."""
    out = {}
    if enc.raw.get("image"):
        out["images"] = [png(im) for im in enc.raw["image"]]
    if enc.raw.get("video"):
        out["videos"] = [_video(frames, i, enc, adapter, None if video_times is None else video_times[i])
                         for i, frames in enumerate(enc.raw["video"])]
    if enc.raw.get("audio"):
        rate = int(adapter.sampling_rate)
        out["audios"] = [{"data": base64.b64encode(np.asarray(a, dtype="<f4").tobytes()).decode(),
                          "sampling_rate": rate} for a in enc.raw["audio"]]
    return out


def compact_prompt(ids: list[int], placeholder_ids: set[int]) -> list[int]:
    """Each run of one media placeholder token collapsed to a single token (vLLM expands it)."""
    out = []
    for t in ids:
        if not (out and t == out[-1] and t in placeholder_ids):
            out.append(t)
    return out


def engine_prompt(ids: list[int], enc, model_type: str, tok, placeholder_ids: set[int]):
    """The trainer's prompt with its media placeholders as vLLM expands them again, and (Qwen3-VL)
    the times of each video's temporal patches its text gives (else None); None where a Qwen3-VL
    prompt does not hold its videos in the adapter's form (`qwen3_video_prompt`)."""
    if model_type == "gemma3":
        return gemma3_prompt(ids, tok, boi=tok.convert_tokens_to_ids(tok.boi_token),
                             eoi=tok.convert_tokens_to_ids(tok.eoi_token)), None
    if model_type == "internvl":
        return span_prompt(ids, start=tok.start_image_token_id, pad=tok.context_image_token_id,
                           end=tok.end_image_token_id), None
    times = None
    if model_type == "qwen3_vl" and enc.raw.get("video"):
        start, pad, end = tok.convert_tokens_to_ids(["<|vision_start|>", "<|video_pad|>", "<|vision_end|>"])
        got = qwen3_video_prompt(ids, [int(g[0]) for g in enc.media["video_grid_thw"]], pad=pad, start=start,
                                 end=end, tokenizer=tok)
        if got is None:
            return None
        ids, times = got
    return compact_prompt(ids, placeholder_ids), times


def span_prompt(ids: list[int], *, start: int, pad: int, end: int) -> list[int]:
    """Each `start` + run of `pad` + `end` (InternVL's `<img><IMG_CONTEXT>...</img>`) collapsed to
    one `pad`, which vLLM expands to the whole span again; other tokens unchanged."""
    out, i = [], 0
    while i < len(ids):
        j = i + 1
        if ids[i] == start and j < len(ids) and ids[j] == pad:
            while j < len(ids) and ids[j] == pad:
                j += 1
            if j < len(ids) and ids[j] == end:
                out.append(pad)
                i = j + 1
                continue
        out.append(ids[i])
        i += 1
    return out


def gemma3_prompt(ids: list[int], tokenizer, *, boi: int, eoi: int) -> list[int]:
    """Gemma 3's prompt as vLLM takes it: each image's `\\n\\n<start_of_image>` + soft tokens +
    `<end_of_image>\\n\\n` (as the processor expanded it, within the text) back to one
    `<start_of_image>`, which vLLM expands again. The newlines may share tokens with their
    neighbours' (Gemma's `\\n\\n\\n` after `user\\n`): those keep the newlines that are not the
    image's, as vLLM's own re-merge of newline tokens expects. Returned unchanged where no such
    newlines surround an image (the engine's expanded-prompt check then names the mismatch)."""
    def newlines(t: int) -> int:
        text = tokenizer.decode([t])
        return len(text) if text and set(text) == {"\n"} else 0

    def strip(tokens: list[int]) -> list[int] | None:  # two newlines off the front of `tokens`
        count = taken = 0
        while count < 2 and taken < len(tokens) and (k := newlines(tokens[taken])):
            count, taken = count + k, taken + 1
        if count < 2:
            return None
        rest = tokenizer.encode("\n" * (count - 2), add_special_tokens=False) if count > 2 else []
        return rest + tokens[taken:]

    out, rest = [], list(ids)
    while boi in rest:
        k = rest.index(boi)
        out += rest[:k]
        if eoi not in rest[k:]:
            return list(ids)
        end = rest.index(eoi, k)
        before, after = strip(out[::-1]), strip(rest[end + 1:])
        if before is None or after is None:
            return list(ids)
        out, rest = before[::-1] + [boi], after
    return out + rest


# Qwen3-VL: vLLM writes a temporal patch's time as the mean of its frames' frames_indices / fps,
# with one decimal; at this fps whole indices give back the trainer's one-decimal times exactly.
TIME_RATE = 10


def qwen3_video_prompt(ids: list[int], grid_t: list[int], *, pad: int, start: int, end: int, tokenizer):
    """Qwen3-VL's prompt as vLLM takes it, and the times its videos' text gives.

    The trainer writes a video as `<|vision_start|>` + for each temporal patch `<t seconds>`
    `<|vision_start|>` + pads + `<|vision_end|>`, then `<|vision_end|>`; vLLM expands one
    `<|video_pad|>` between the outer markers into that, timestamps from the video's metadata.

    Args:
        ids: the trainer's prompt.
        grid_t: temporal patches of each video, in order (`video_grid_thw[:, 0]`).
        pad, start, end: the ids of `<|video_pad|>`, `<|vision_start|>`, `<|vision_end|>`.
        tokenizer: decodes the timestamp tokens.

    Returns:
        (prompt with each video's inside collapsed to one pad, seconds of each video's
        temporal patches), or None where the prompt does not hold the videos so.
    """
    import re

    out, times, i = [], [], 0
    for frames in grid_t:
        while i < len(ids) and ids[i] != pad:
            out.append(ids[i])
            i += 1
        if i == len(ids) or len(out) < 2 or out[-1] != start or start not in out[:-1]:
            return None
        outer = len(out) - 2 - out[-2::-1].index(start)
        stamps, out = [out[outer + 1:-1]], out[:outer + 1]
        for f in range(frames):
            if f:  # this patch's timestamp, up to its own vision start
                if start not in ids[i:]:
                    return None
                q = ids.index(start, i)
                stamps.append(ids[i:q])
                i = q + 1
            if i == len(ids) or ids[i] != pad:
                return None
            while i < len(ids) and ids[i] == pad:
                i += 1
            if i == len(ids) or ids[i] != end:
                return None
            i += 1
        found = [re.fullmatch(r"\s*<(\d+(?:\.\d)?) seconds>\s*", tokenizer.decode(t)) for t in stamps]
        if not all(found):
            return None
        times.append([float(m.group(1)) for m in found])
        out.append(pad)
    return out + ids[i:], times


def _video(frames, i: int, enc, adapter, times: list[float] | None = None) -> dict:
    from PIL import Image

    ip = adapter.image_processor
    _, gh, gw = (int(x) for x in enc.media["video_grid_thw"][i])
    height, width = gh * ip.patch_size, gw * ip.patch_size
    sized = []
    for frame in np.asarray(frames):
        image = Image.fromarray(frame)
        if frame.shape[:2] != (height, width):  # as qwen_video_inputs resizes
            image = image.resize((width, height), resample=int(ip.resample))
        sized.append(png(image))
    video = {"frames": sized}
    if times is not None:  # Qwen3-VL: each frame's index at TIME_RATE is its temporal patch's time
        tp = ip.temporal_patch_size
        video.update(fps=float(TIME_RATE),
                     frames_indices=[round(times[f // tp] * TIME_RATE) for f in range(len(sized))])
    for key in ("second_per_grid_ts", "video_second_per_grid"):  # Qwen2.5-VL's, Qwen2.5-Omni's
        if key in enc.media:
            # tp / (tp / seconds) gives back the trainer's float32 seconds once vLLM stores it as float32.
            video["fps"] = ip.temporal_patch_size / float(enc.media[key][i])
    return video


# -- engine side -------------------------------------------------------------------------------
def _image(data: str):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


def processor_kwargs(prompt: dict, model_type: str) -> dict:
    """vLLM's `mm_processor_kwargs` for one request prompt: the fps of its videos for a family
    in FPS_KWARG_FAMILIES (one fps for all of them: Qwen2_5OmniProcessor takes one)."""
    if model_type not in FPS_KWARG_FAMILIES or not prompt.get("videos"):
        return {}
    rates = {float(v["fps"]) for v in prompt["videos"] if v.get("fps")}
    if len(rates) != 1 or any(not v.get("fps") for v in prompt["videos"]):
        raise ValueError(f"{model_type}: the videos of one prompt need one fps (Qwen2_5OmniProcessor takes one per "
                         f"call), got {sorted(rates) or 'none'}. Fix: sample every video of a prompt at the same fps.")
    return {"fps": rates.pop()}


def engine_media(prompt: dict) -> dict:
    """vLLM's `multi_modal_data` for one request prompt (empty when it has no media)."""
    data = {}
    if prompt.get("images"):
        data["image"] = [_image(b) for b in prompt["images"]]
    if prompt.get("videos"):
        videos = []
        for v in prompt["videos"]:
            frames = np.stack([np.asarray(_image(f)) for f in v["frames"]])
            indices = v.get("frames_indices") or list(range(len(frames)))
            meta = {"total_num_frames": len(frames), "frames_indices": [int(k) for k in indices],
                    "height": int(frames.shape[1]), "width": int(frames.shape[2]),
                    "video_backend": "lightrft_mm", "do_sample_frames": False}
            if v.get("fps"):
                meta.update(fps=float(v["fps"]), duration=len(frames) / float(v["fps"]))
            videos.append((frames, meta))
        data["video"] = videos
    if prompt.get("audios"):
        data["audio"] = [(np.frombuffer(base64.b64decode(a["data"]), dtype="<f4").copy(), int(a["sampling_rate"]))
                         for a in prompt["audios"]]
    return data


def _is_clip_list(v) -> bool:
    """A list of whole clips ([T, H, W, 3] arrays), not one clip's frames."""
    import torch

    return isinstance(v, (list, tuple)) and bool(v) and all(
        isinstance(c, (np.ndarray, torch.Tensor)) and c.ndim == 4 for c in v)


class QwenVideoProcessor(dict):
    """The video processor of a Qwen2-VL / Qwen2.5-VL processor inside a vLLM engine: the
    trainer's `qwen_video_inputs` on the frames the trainer sampled (never sampled again).

    transformers' `Qwen2VLVideoProcessor` needs torchvision, and where it exists it resizes with
    torchvision, not as the trainer does. A dict (empty), so that the processor still
    serialises; the sizes and pixel statistics are the image processor's, as in the trainer.
    """

    # The keywords transformers and vLLM route to a video processor (what __call__ accepts).
    valid_kwargs = type("QwenVideoKwargs", (), {"__annotations__": {
        "do_sample_frames": bool, "video_metadata": object, "return_metadata": bool, "do_rescale": bool,
        "do_normalize": bool, "fps": float}})

    def __init__(self, image_processor):
        super().__init__()
        self.image_processor = image_processor
        self.size = image_processor.size  # the bounds vLLM's Qwen3-VL sizes its video budget by
        self.patch_size = image_processor.patch_size
        self.merge_size = image_processor.merge_size
        self.temporal_patch_size = image_processor.temporal_patch_size

    def __call__(self, videos=None, *, video_metadata=None, return_metadata=False, return_tensors=None,
                 do_sample_frames=None, do_rescale=None, do_normalize=None, fps=None, size=None, **kwargs):
        # Qwen2_5OmniProcessor passes on `fps` (it derives video_second_per_grid from it) and its
        # default video `size` bounds: the frames arrive sampled at that fps and sized by the
        # trainer, and are never sampled or resized again here (the `frame_size` rule below).
        import torch
        from transformers import BatchFeature
        from transformers.video_utils import VideoMetadata

        from lightrft_mm.processors.video import qwen_video_inputs

        if do_sample_frames:
            raise ValueError("this engine's video processor does not sample frames: the trainer sends the frames "
                             "it sampled. Fix: do_sample_frames=False (the lightrft_mm client sends it).")
        if do_rescale is False or do_normalize is False:
            raise ValueError("this engine's video processor rescales and normalises on the CPU, as the trainer "
                             "does. Fix: start vLLM with mm_device_do_normalize=False (lightrft-mm vllm-serve does).")
        unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in ("device", "input_data_format"))
        if unknown:
            raise ValueError(f"this engine's video processor takes no {', '.join(unknown)}: frames arrive sampled "
                             "and sized by the trainer's adapter.")
        if videos is None:
            videos = []
        elif isinstance(videos, np.ndarray) and videos.ndim == 4:
            videos = [videos]
        if all(_is_clip_list(v) for v in videos):  # batched: [[clip], ...] (vLLM's Qwen3-VL)
            videos = [c for v in videos for c in v]
            if isinstance(video_metadata, (list, tuple)) and all(isinstance(m, (list, tuple)) for m in video_metadata):
                video_metadata = [m for ms in video_metadata for m in ms]
        clips = [np.stack([np.asarray(f) for f in v]) if isinstance(v, (list, tuple)) else np.asarray(v)
                 for v in videos]
        clips = [c.numpy() if isinstance(c, torch.Tensor) else c for c in clips]
        factor = self.patch_size * self.merge_size
        # Frames at multiples of patch * merge size were sized by the trainer (the client resizes them to its
        # grid): kept. Others (vLLM's profiling inputs) are sized by the image processor's bounds.
        outs = [qwen_video_inputs(c.astype(np.uint8, copy=False), self.image_processor,
                                  frame_size=c.shape[1:3] if c.shape[1] % factor == c.shape[2] % factor == 0 else None)
                for c in clips]
        data = {"pixel_values_videos": torch.cat([o["pixel_values_videos"] for o in outs]) if outs else
                torch.zeros((0, 3 * self.temporal_patch_size * self.patch_size ** 2)),
                "video_grid_thw": torch.cat([o["video_grid_thw"] for o in outs]) if outs else
                torch.zeros((0, 3), dtype=torch.long)}
        if return_metadata:
            metas = video_metadata if isinstance(video_metadata, (list, tuple)) else [video_metadata] * len(clips)
            if len(metas) != len(clips) or any(m is None or not m.get("fps") for m in metas):
                raise ValueError("video metadata with the sampled fps is needed for every video (Qwen2.5-VL's "
                                 "second_per_grid_ts = temporal_patch / fps); the lightrft_mm client sends it.")
            data["video_metadata"] = [m if isinstance(m, VideoMetadata) else
                                      VideoMetadata(**{k: v for k, v in m.items() if k != "do_sample_frames"})
                                      for m in metas]
        return BatchFeature(data, tensor_type=return_tensors, skip_tensor_conversion=["video_metadata"])

    def get_num_of_video_patches(self, num_frames: int, height: int, width: int, videos_kwargs=None) -> int:
        from lightrft_mm.processors.video import video_frame_size

        factor = self.patch_size * self.merge_size
        h, w = (height, width) if height % factor == width % factor == 0 else \
            video_frame_size(height, width, num_frames, self.image_processor)
        t = -(-num_frames // self.temporal_patch_size)
        return t * (h // self.patch_size) * (w // self.patch_size)


__all__ = ["NO_VIDEO_FAMILIES", "QwenVideoProcessor", "audio_window_problem", "compact_prompt", "engine_media",
           "engine_prompt", "gemma3_prompt", "processor_kwargs", "prompt_media", "qwen3_video_prompt", "span_prompt"]
