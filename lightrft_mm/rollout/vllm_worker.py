"""vLLM worker extension: load weights the trainer sent, in place (imported inside vLLM's workers),
and Qwen-VL M-RoPE positions as the trainer computes them.

Passed to vLLM as ``worker_extension_cls`` (by ``lightrft-mm vllm-serve``, or to plain
``vllm serve --worker-extension-cls lightrft_mm.rollout.vllm_worker.WeightSync``); every worker
(each tensor-parallel rank) then has the method below, called through ``collective_rpc``, and
importing this module makes the workers' Qwen2-VL / Qwen2.5-VL position ids the trainer's
(`follow_trainer_positions`). `vllm_server` also applies, in the process that processes the
prompts, the processor patches of Gemma 3 (`follow_gemma3_newlines`) and, without torchvision,
InternVL (`follow_internvl_without_video`). Nothing here imports the rest of the package but the
standard-library `vllm_shims`: it runs in vLLM's environment.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class WeightSync:
    """Mixed into vLLM's worker class."""

    def lightrft_load_files(self, paths: list[str]) -> int:
        """Load the tensors of these safetensors files (checkpoint names) into the live model
        and drop what was computed from the old weights (encoder and multimodal caches). The CPU
        backend repacks its linear weights, so a plain `load_weights` on the live model would not
        do: `reload_weights` re-runs the loader's post-processing. Returns the tensor count."""
        from safetensors import safe_open

        count = 0

        def tensors():
            nonlocal count
            for path in paths:
                with safe_open(path, framework="pt", device="cpu") as f:
                    for name in f.keys():
                        count += 1
                        yield name, f.get_tensor(name)

        self.model_runner.reload_weights(weights_iterator=tensors())
        return count


def trainer_positions(self, input_tokens: list[int], mm_features) -> tuple:
    """M-RoPE position ids [3, L] and the decode offset of one prompt, by transformers 5's rule
    (the trainer's, `Qwen2VLModel.get_rope_index`): text counts on from the position after the
    previous block; a vision block of (t, h, w) merged patches starting at position p gets
    temporal p + floor(i * interval) (interval = tokens_per_second * second_per_grid_ts for
    Qwen2.5-VL videos, else 1), height p + row, width p + column, and the text after it starts at
    p + max(h, w). vLLM 0.32 starts that text after the block's largest position instead (the
    temporal one of a long video), so without this rule its video prompts would be another
    policy's. Images (t = 1) get the same positions under both rules.

    `self.iter_mm_grid_thw` is vLLM's: (offset, t, h, w, interval) of each image / video."""
    import numpy as np
    import torch

    pieces, pos, done = [], 0, 0
    for offset, t, h, w, interval in self.iter_mm_grid_thw(mm_features):
        n = offset - done
        pieces.append(np.broadcast_to(np.arange(n), (3, n)) + pos)
        pos += n
        # float32 steps, floored after the multiply, as transformers does them.
        times = (np.arange(t, dtype=np.float32) * np.float32(interval)).astype(np.int64)
        grid = np.stack(np.meshgrid(times, np.arange(h), np.arange(w), indexing="ij")).reshape(3, -1)
        pieces.append(grid + pos)
        pos += max(h, w)
        done = offset + t * h * w
    if (n := len(input_tokens) - done) > 0:
        pieces.append(np.broadcast_to(np.arange(n), (3, n)) + pos)
    positions = np.concatenate(pieces, axis=1).astype(np.int64)
    return torch.from_numpy(positions), int(positions.max()) + 1 - len(input_tokens)


def follow_trainer_positions() -> None:
    """Make vLLM's Qwen2-VL and Qwen2.5-VL compute `trainer_positions` (in this process)."""
    try:
        from vllm.model_executor.models import qwen2_5_vl, qwen2_vl
    except ImportError:  # not in vLLM's environment
        return
    for cls in (qwen2_vl.Qwen2VLForConditionalGeneration, qwen2_5_vl.Qwen2_5_VLForConditionalGeneration):
        if not hasattr(cls, "iter_mm_grid_thw"):
            log.warning("%s has no iter_mm_grid_thw (a vLLM other than 0.32?): its video position ids stay "
                        "vLLM's own and may differ from the trainer's", cls.__name__)
            continue
        cls.get_mrope_input_positions = trainer_positions


def _newline_ids(tokenizer) -> dict[int, int | None]:
    """k -> the one token id the tokenizer gives k newlines (None where it gives several)."""
    out = {}
    for k in (1, 2, 3, 4):
        ids = tokenizer.encode("\n" * k, add_special_tokens=False)
        out[k] = ids[0] if len(ids) == 1 else None
    return out


def gemma3_token_matches(self, prompt, mm_prompt_updates):
    """vLLM 0.32's Gemma 3 prompt update (`Gemma3MultiModalProcessor._apply_token_matches`), its
    re-merge of the newline tokens next to an image (`\\n` + `\\n\\n` -> `\\n\\n\\n`, ...)
    done with the ids the tokenizer gives those newlines, only where it has one token for each.
    vLLM looks them up by the names `"\\n"`, `"\\n\\n"` ..., which a byte-level BPE (the tiny
    models', `Ċ`) does not have."""
    from vllm.multimodal.processing.processor import BaseMultiModalProcessor, replace_token_matches

    token_ids, res = BaseMultiModalProcessor._apply_token_matches(self, prompt, mm_prompt_updates)
    nl = _newline_ids(self.info.get_tokenizer())
    for a, b, merged in ((1, 2, 3), (2, 1, 3), (2, 2, 4)):
        if None not in (nl[a], nl[b], nl[merged]):
            token_ids = replace_token_matches(token_ids, [nl[a], nl[b]], [nl[merged]])
    return token_ids, res


def gemma3_find_placeholders(self, new_token_ids, mm_prompt_updates):
    """vLLM 0.32's `Gemma3MultiModalProcessor._find_mm_placeholders` (an image's `\\n\\n` found
    inside a merged `\\n\\n\\n` / `\\n\\n\\n\\n`), with the newline ids of `_newline_ids`."""
    from vllm.multimodal.processing.processor import BaseMultiModalProcessor, PlaceholderFeaturesInfo

    nl = _newline_ids(self.info.get_tokenizer())
    split = {nl[3]: [nl[1], nl[2]], nl[4]: [nl[2], nl[2]]}
    split = {k: v for k, v in split.items() if k is not None and None not in v}
    ids, origin = [], []
    for i, tok in enumerate(new_token_ids):
        parts = split.get(tok, [tok])
        ids += parts
        origin += [i] * len(parts)
    found = BaseMultiModalProcessor._find_mm_placeholders(self, ids, mm_prompt_updates)
    return {modality: [PlaceholderFeaturesInfo(modality=p.modality, item_idx=p.item_idx,
                                               start_idx=origin[p.start_idx], tokens=p.tokens, is_embed=p.is_embed)
                       for p in placeholders]
            for modality, placeholders in found.items()}


def follow_gemma3_newlines() -> None:
    """Make vLLM's Gemma 3 processor use `gemma3_token_matches` (in this process: the one that
    processes the prompts, `vllm_server` calls it for a Gemma 3 model)."""
    try:
        from vllm.model_executor.models import gemma3_mm
    except ImportError:  # not in vLLM's environment
        return
    cls = gemma3_mm.Gemma3MultiModalProcessor
    if not all(hasattr(cls, m) for m in ("_apply_token_matches", "_find_mm_placeholders")) \
            or not hasattr(gemma3_mm, "PlaceholderFeaturesInfo"):
        log.warning("vLLM's Gemma 3 processor is not 0.32's: its newline handling stays vLLM's own")
        return
    cls._apply_token_matches = gemma3_token_matches
    cls._find_mm_placeholders = gemma3_find_placeholders


def internvl_processor_without_video(self, **kwargs):
    """vLLM 0.32's `InternS1ProcessingInfo.get_hf_processor` (transformers-format InternVL) without
    the video processor it builds: that needs torchvision (`AutoVideoProcessor`). The engine
    allows InternVL no video (`vllm_media.NO_VIDEO_FAMILIES`)."""
    from transformers import InternVLProcessor

    from lightrft_mm.rollout.vllm_shims import NoVideoProcessor

    processor = self.ctx.get_hf_processor(InternVLProcessor, **kwargs)
    if not isinstance(getattr(processor, "video_processor", None), NoVideoProcessor):
        processor.video_processor = NoVideoProcessor()
    return processor


def follow_internvl_without_video() -> None:
    """Make vLLM's InternVL (InternS1 module) build its processor by `internvl_processor_without_video`
    (in the process that processes the prompts; `vllm_server` calls it where torchvision is absent)."""
    try:
        from vllm.model_executor.models import interns1
    except ImportError:  # not in vLLM's environment
        return
    if not hasattr(interns1, "InternS1ProcessingInfo"):
        log.warning("vLLM has no InternS1ProcessingInfo (a vLLM other than 0.32?): InternVL's processor stays "
                    "vLLM's own")
        return
    interns1.InternS1ProcessingInfo.get_hf_processor = internvl_processor_without_video


follow_trainer_positions()
