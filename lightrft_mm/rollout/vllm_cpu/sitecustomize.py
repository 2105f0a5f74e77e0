"""Loaded at start-up by every process of a CPU vLLM engine (the server puts this folder on
PYTHONPATH when torchvision is absent; DESIGN §10). See `lightrft_mm.rollout.vllm_shims`."""

try:
    from lightrft_mm.rollout.vllm_shims import install

    install()
except Exception as e:  # never stop an interpreter from starting
    import sys

    print(f"lightrft_mm: vLLM CPU shims not installed: {e}", file=sys.stderr)
