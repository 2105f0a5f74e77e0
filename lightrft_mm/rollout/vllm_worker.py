"""vLLM worker extension: load weights the trainer sent, in place (imported inside vLLM's workers).

Passed to vLLM as ``worker_extension_cls`` (by ``lightrft-mm vllm-serve``, or to plain
``vllm serve --worker-extension-cls lightrft_mm.rollout.vllm_worker.WeightSync``); every worker
(each tensor-parallel rank) then has the method below, called through ``collective_rpc``.
Nothing here imports the rest of the package: it runs in vLLM's environment.
"""

from __future__ import annotations


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
