"""Qwen3-VL adapter: text, images, several images and videos with their text timestamps.

The prompt is built by hand, token for token as transformers' `Qwen3VLProcessor` writes it
(its video processor needs torchvision). The chat template writes one
`<|vision_start|><|image_pad|><|vision_end|>` (or `<|video_pad|>`) per media part, then:

- an image pad becomes grid t*h*w / merge_size^2 image pads (as Qwen2-VL);
- a video pad becomes, for each temporal patch of the video (grid_t of them), its time as text
  and the frame's vision tokens: `<0.5 seconds><|vision_start|>` + h*w / merge_size^2 video pads +
  `<|vision_end|>`. The time is the mean of the first and last frame time of the temporal patch,
  with one decimal (`Qwen3VLProcessor._calculate_timestamps`); the template's own
  `<|vision_start|>` / `<|vision_end|>` stay around the whole video, as transformers >= 5.10
  expands only the pad.

`mm_token_type_ids` marks image (1) and video (2) pads; the model's M-RoPE index
(`get_rope_index`) splits each video grid into grid_t one-frame grids and relies on the text
between the frames. Qwen3-VL carries time in the timestamps, not in the positions, so there is
no `second_per_grid_ts`. Frames are sampled and sized as for Qwen2.5-VL (qwen-vl-utils' rules,
`lightrft_mm.processors.video`), with this model's patch size (16: 32-pixel merged tokens).

Everything is read from the processor (patch, merge and temporal patch sizes, pixel bounds, the
token strings), so the adapter serves any checkpoint of the family, and families whose vision
path is Qwen3-VL's (Qwen3.5) can reuse it.
"""

from __future__ import annotations

import numpy as np
import torch

from lightrft_mm.errors import MediaError
from lightrft_mm.processors.qwen_vl import VIDEO_PAD, QwenVLAdapter
from lightrft_mm.processors.video import qwen_video_inputs
from lightrft_mm.schema import Sample

VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"


def temporal_patch_times(timestamps, temporal_patch: int) -> list[float]:
    """Time of each temporal patch: the mean of its first and last frame's time, in seconds.

    As `Qwen3VLProcessor._calculate_timestamps`: the frame times are padded with the last one
    to a multiple of `temporal_patch`.

    Args:
        timestamps: [T] time of each sampled frame, in seconds from the start of the video.
        temporal_patch: frames per temporal patch.

    Returns:
        ceil(T / temporal_patch) times.
    """
    times = [float(t) for t in np.asarray(timestamps).reshape(-1)]
    if not times:
        return []
    times += [times[-1]] * (-len(times) % temporal_patch)
    return [(times[i] + times[i + temporal_patch - 1]) / 2 for i in range(0, len(times), temporal_patch)]


def video_placeholder(times: list[float], tokens_per_frame: int, *, video_token: str = VIDEO_PAD,
                      start: str = VISION_START, end: str = VISION_END) -> str:
    """The text a Qwen3-VL video pad expands to: `<t seconds>` + start + pads + end per temporal patch."""
    return "".join(f"<{t:.1f} seconds>{start}{video_token * tokens_per_frame}{end}" for t in times)


class Qwen3VLAdapter(QwenVLAdapter):
    """Adapter of the Qwen3-VL family (DESIGN.md §4 `ModelAdapter`).

    Args:
        processor: a Qwen3-VL processor (with `image_processor`, `tokenizer`, chat template).
        system_prompt: added to samples that carry no system message.
        image, video, audio: the config sections; `video` gives the decoder backend and the
            default fps / max_frames (a video part's own `fps` / `max_frames` win).
        model_type: recorded for error messages; Qwen3-VL sends no `second_per_grid_ts`.
    """

    model_type = "qwen3_vl"
    family_name = "Qwen3-VL"

    def __init__(self, processor, *, system_prompt: str | None = None, image=None, video=None,
                 audio=None, model_type: str | None = None):
        super().__init__(processor, system_prompt=system_prompt, image=image, video=video, audio=audio,
                         model_type=model_type or type(self).model_type)
        self.vision_start = getattr(processor, "vision_start_token", VISION_START)
        self.vision_end = getattr(processor, "vision_end_token", VISION_END)

    @property
    def sends_second_per_grid(self) -> bool:
        return False

    def _videos(self, sample: Sample, where: str, media: dict, raw: dict) -> list[tuple[str, int]]:
        """Video tensors into `media`; returns each video's (timestamped frames text, video tokens)."""
        parts = sample.media("video")
        if not parts:
            return []
        ip = self.image_processor
        merge = ip.merge_size ** 2
        pixels, grids, out = [], [], []
        for part in parts:
            clip = self.load_clip(part, where)
            raw.setdefault("video", []).append(clip.frames)
            inputs = qwen_video_inputs(clip.frames, ip, **self.video_pixels())
            pixels.append(inputs["pixel_values_videos"])
            grids.append(inputs["video_grid_thw"])
            gt, gh, gw = (int(x) for x in inputs["video_grid_thw"][0])
            times = temporal_patch_times(clip.timestamps, ip.temporal_patch_size)
            if len(times) != gt:
                raise MediaError(f"{where}: video {part.video} gave {len(clip.timestamps)} frame times for "
                                 f"{gt} temporal patches of frames. Fix: re-encode the video (e.g. `ffmpeg -i IN "
                                 "-c:v libx264 -pix_fmt yuv420p OUT.mp4`); its decoder returned frames and times "
                                 "that do not match.")
            per_frame = gh * gw // merge
            text = video_placeholder(times, per_frame, video_token=VIDEO_PAD, start=self.vision_start,
                                     end=self.vision_end)
            out.append((text, gt * per_frame))
        media["pixel_values_videos"] = torch.cat(pixels)
        media["video_grid_thw"] = torch.cat(grids)
        return out


__all__ = ["Qwen3VLAdapter", "temporal_patch_times", "video_placeholder"]
