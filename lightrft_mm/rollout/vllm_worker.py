"""vLLM worker extension: load weights the trainer sent, in place (imported inside vLLM's workers),
and Qwen-VL M-RoPE positions as the trainer computes them.

Passed to vLLM as ``worker_extension_cls`` (by ``lightrft-mm vllm-serve``, or to plain
``vllm serve --worker-extension-cls lightrft_mm.rollout.vllm_worker.WeightSync``); every worker
(each tensor-parallel rank) then has the method below, called through ``collective_rpc``, and
importing this module makes the workers' Qwen2-VL / Qwen2.5-VL position ids the trainer's
(`follow_trainer_positions`). Nothing here imports the rest of the package: it runs in vLLM's
environment.
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


follow_trainer_positions()
