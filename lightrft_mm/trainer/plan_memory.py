"""The per-GPU memory estimate of `lightrft-mm train CONFIG --dry-run` (`lightrft_mm.trainer.plan`).

Every term is bytes on one GPU, from the parameter counts of the meta-device model and the run's
config. Notation: P parameters, T trainable elements, K trainable tensors, W world size, b the
compute dtype's bytes (2 for bf16 / fp16, 4 for fp32), L decoder layers, h hidden size, I the MLP's
intermediate size, kv = kv_heads x head_dim.

- Parameters, gradients, optimizer state (AdamW: two fp32 moments, 8 B per trainable element, plus a
  4 B step counter per trainable tensor), fp32 master weights, by strategy:
  single: fp32 parameters 4P (the masters themselves), gradients 4T, optimizer 8T + 4K.
  fsdp2: fp32 parameter shards 4P / W (the masters), gradient shards 4T / W, optimizer / W, and the
  all-gather buffer of the unsharded units in flight (the largest unit's own parameters x b, twice:
  the one computing and the one prefetched); strategy.offload=all moves the shards to the CPU.
  deepspeed: the module in the compute dtype (4P under fp32, else 2P; / W at ZeRO-3, with the same
  gather buffer as fsdp2), gradients 4T (/ W from stage 2), fp32 masters 4T / W under bf16 / fp16
  (none under fp32), optimizer / W; offload=optimizer moves masters and optimizer state to the CPU.
  Gradients are counted as resident throughout (an upper bound).
- The frozen KL reference (algorithm.kl_coef > 0 without LoRA): P x b, sharded like the policy.
- Activations of one training forward / backward pass (micro-batch): rows = trainer.micro_batch_groups
  x rollout.n (0: the rank's prompts of a mini-batch x n), each (prompt + max response) tokens long,
  so tokens = rows x (prompt + max_new_tokens), an upper bound (rows are padded to the longest).
  Without gradient checkpointing every decoder layer keeps, per token, b x (8h + 2kv + 4I) bytes
  (norm inputs and outputs, q / k / v, attention output and its log-sum-exp, the MLP's gate, up,
  activation and product; sdpa / flash attention keep no T x T matrix, eager adds b x 2 x heads x T
  per token; bf16 / fp16 add 6h bytes, the RMSNorms' fp32 upcasts): L x b x (8h + 2kv + 4I) x tokens,
  checked against the bytes autograd saves (tests/test_dry_run.py; within 3 % in fp32 and bf16).
  With model.gradient_checkpointing only each layer's input is kept, L x b x h x tokens, plus one
  layer recomputed in full, b x (8h + 2kv + 4I) x tokens.
  Both add the final hidden states, b x h x tokens.
- Vision tower activations (0 when it is frozen): an upper bound that takes every prompt token for an
  image token, patches = prompts x prompt tokens x patches per image token (Qwen's spatial merge 4,
  InternVL's pixel shuffle, Gemma 3's pooling 16, LLaVA 1), prompts = the pass's groups (its rows
  without trainer.encode_prompts_once); per block and patch b x (10w + 4I_v) bytes (w its width, full
  multi-head attention), or with checkpointing b x w per block plus one block in full. Audio tower
  activations are not counted.
- The chunked log-prob head (models.logprobs.CHUNK_ELEMENTS): one chunk of fp32 vocabulary logits,
  its log-softmax and its gradient, 3 x 4 B x positions x vocabulary, positions = min(CHUNK_ELEMENTS //
  vocabulary, the micro-batch's completion tokens rows x max_new_tokens): at most 3 x 4 B x CHUNK_ELEMENTS.
- The rollout engine. vLLM colocated: rollout.vllm.gpu_memory_utilization x capacity (its weights and
  KV cache); with rollout.vllm.sleep it frees that while the trainer trains, so the peak is the larger
  of the training phase and the rollout phase; without sleep it is resident in both. vLLM server mode:
  other GPUs, 0 here. HF generate: the KV cache of the rank's prompts x n rows, L x 2 x kv x rows x
  (prompt + max_new_tokens) x b, during rollout only.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightrft_mm.models.logprobs import CHUNK_ELEMENTS

GIB = 1024 ** 3


def human(n: float) -> str:
    """Bytes as B / KiB / MiB / GiB with 2 decimals."""
    for unit, size in (("GiB", GIB), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,.0f} B"


@dataclass
class Term:
    """One line of the estimate: `phase` is "both" (resident throughout), "train" or "rollout"."""

    name: str
    bytes: float
    how: str
    phase: str = "both"


@dataclass
class Shape:
    """What the estimate needs of the model (from its config and its meta-device parameters)."""

    params: int  # P
    trainable: int  # T
    trainable_tensors: int  # K
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_dim: int  # kv_heads x head_dim
    largest_unit: int  # parameters of the largest unit FSDP2 / ZeRO-3 gathers at once
    vocab: int = 0
    vision_layers: int = 0  # 0: no vision tower
    vision_width: int = 0
    vision_intermediate: int = 0
    patches_per_token: int = 1  # vision patches behind one image token of the prompt
    vision_trains: bool = False  # the tower keeps activations for a backward (not frozen)


def text_shape(config) -> dict:
    """Layers, hidden, intermediate, heads and kv width of the language model of an HF config."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return {"layers": text.num_hidden_layers, "hidden": text.hidden_size, "heads": heads,
            "intermediate": getattr(text, "intermediate_size", None) or 4 * text.hidden_size,
            "kv_dim": kv_heads * head_dim, "vocab": text.vocab_size}


def vision_shape(config) -> dict:
    """Depth, width, MLP width of the vision tower of an HF config, and the patches behind one image
    token (Qwen's spatial merge, InternVL's pixel shuffle, Gemma 3's pooling; 1 for LLaVA); {} without one."""
    vision = getattr(config, "vision_config", None) or getattr(getattr(config, "thinker_config", None),
                                                               "vision_config", None)
    if vision is None:
        return {}
    width = getattr(vision, "embed_dim", None) or vision.hidden_size
    depth = getattr(vision, "depth", None) or getattr(vision, "num_hidden_layers", 0)
    inter = getattr(vision, "intermediate_size", None) or int(getattr(vision, "mlp_ratio", 4) * width)
    patches = 1
    if getattr(vision, "spatial_merge_size", None):
        patches = vision.spatial_merge_size ** 2
    elif getattr(config, "downsample_ratio", None):
        patches = round(1 / config.downsample_ratio ** 2)
    elif getattr(config, "mm_tokens_per_image", None) and getattr(vision, "image_size", None):
        patches = max(1, (vision.image_size // vision.patch_size) ** 2 // config.mm_tokens_per_image)
    return {"vision_layers": depth, "vision_width": width, "vision_intermediate": inter, "patches_per_token": patches}


def _bytes_of(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def _n(x: float) -> str:
    return f"{x / 1e9:.2f}B" if x >= 1e8 else f"{int(x):,}"


def state_terms(cfg, shape: Shape, world: int) -> list[Term]:
    """Parameters, gradients, master weights, optimizer state and the gather buffer (see module doc)."""
    s, P, T, K, W = cfg.strategy, shape.params, shape.trainable, shape.trainable_tensors, world
    b = _bytes_of(s.precision)
    opt = 8 * T + 4 * K
    gather = Term("all-gather buffer", 2 * shape.largest_unit * b,
                  f"2 x largest unit {_n(shape.largest_unit)} x {b} B (computing + prefetched)", "both")
    if s.name == "fsdp2":
        cpu = s.offload == "all"
        where = " (offloaded: on the CPU)" if cpu else ""
        return [Term("parameters", 0 if cpu else 4 * P / W, f"fp32 shards (the masters): 4 B x {_n(P)} / {W}{where}"),
                Term("gradients", 0 if cpu else 4 * T / W, f"fp32 shards: 4 B x {_n(T)} trainable / {W}{where}"),
                Term("master weights", 0, "none apart from the fp32 parameter shards"),
                Term("optimizer state", 0 if cpu else opt / W,
                     f"AdamW 2 fp32 moments: (8 B x {_n(T)} + 4 B x {K} steps) / {W}{where}"), gather]
    if s.name == "deepspeed":
        stage, m = s.zero_stage, 4 if s.precision == "fp32" else 2
        p_div, off_opt = (W if stage == 3 else 1), s.offload in ("optimizer", "all")
        p_cpu = s.offload == "all" and stage == 3
        terms = [Term("parameters", 0 if p_cpu else m * P / p_div,
                      f"module in {'fp32' if m == 4 else s.precision}: {m} B x {_n(P)}"
                      + (f" / {W} (ZeRO-3)" if stage == 3 else " (whole on every rank)")
                      + (" (offloaded: on the CPU)" if p_cpu else "")),
                 Term("gradients", 4 * T / (W if stage >= 2 else 1),
                      f"fp32: 4 B x {_n(T)} trainable" + (f" / {W} (ZeRO-{stage})" if stage >= 2 else " (ZeRO-1)")),
                 Term("master weights", 0 if off_opt or s.precision == "fp32" else 4 * T / W,
                      "none under fp32" if s.precision == "fp32" else f"fp32: 4 B x {_n(T)} / {W}"
                      + (" (offloaded: on the CPU)" if off_opt else "")),
                 Term("optimizer state", 0 if off_opt else opt / W,
                      f"AdamW 2 fp32 moments: (8 B x {_n(T)} + 4 B x {K} steps) / {W}"
                      + (" (offloaded: on the CPU)" if off_opt else ""))]
        return terms + ([gather] if stage == 3 else [])
    return [Term("parameters", 4 * P, f"fp32 (the masters): 4 B x {_n(P)}"),
            Term("gradients", 4 * T, f"fp32: 4 B x {_n(T)} trainable"),
            Term("master weights", 0, "none apart from the fp32 parameters"),
            Term("optimizer state", opt, f"AdamW 2 fp32 moments: 8 B x {_n(T)} + 4 B x {K} steps")]


def reference_term(cfg, shape: Shape, world: int) -> Term:
    """The frozen KL reference copy (none without a KL term, or with LoRA and no warm-up)."""
    needs_copy = cfg.algorithm.kl_coef > 0 and not (cfg.model.lora.r > 0 and not cfg.warmup.steps)
    if not needs_copy:
        why = "kl_coef 0" if cfg.algorithm.kl_coef <= 0 else "the policy with LoRA off"
        return Term("KL reference model", 0, f"none ({why})")
    s = cfg.strategy
    if s.name == "single":
        b = {"float32": 4}.get(cfg.model.dtype, 2)
        return Term("KL reference model", b * shape.params, f"a copy in model.dtype: {b} B x {_n(shape.params)}")
    b = _bytes_of(s.precision)
    div = world if s.name == "fsdp2" or s.zero_stage == 3 else 1
    return Term("KL reference model", b * shape.params / div, f"{b} B x {_n(shape.params)}" + (f" / {world}" if div > 1
                                                                                               else ""))


def per_token_layer(cfg, shape: Shape, seq: int) -> int:
    """Bytes one decoder layer keeps per token for the backward (no checkpointing)."""
    b = _bytes_of(cfg.strategy.precision)
    elems = 8 * shape.hidden + 2 * shape.kv_dim + 4 * shape.intermediate
    if cfg.model.attn_implementation == "eager":
        elems += 2 * shape.heads * seq
    return b * elems + (6 * shape.hidden if b == 2 else 0)  # bf16 / fp16: the RMSNorms' fp32 upcasts


def activation_terms(cfg, shape: Shape, micro_rows: int, seq: int) -> tuple[Term, Term, float, float]:
    """(activations term, log-prob head term, bytes without checkpointing, bytes with checkpointing)."""
    b = _bytes_of(cfg.strategy.precision)
    tokens = micro_rows * seq
    layer = per_token_layer(cfg, shape, seq)
    final = b * shape.hidden * tokens
    without = shape.layers * layer * tokens + final
    with_ckpt = shape.layers * b * shape.hidden * tokens + layer * tokens + final
    on = cfg.model.gradient_checkpointing
    how = (f"{micro_rows} rows x {seq} tokens; " + (f"checkpointed: {shape.layers} layer inputs + 1 layer in full"
                                                    if on else f"{shape.layers} layers x {layer:,} B per token"))
    act = Term("activations" + (" (checkpointed)" if on else ""), with_ckpt if on else without, how, "train")
    positions = min(max(1, CHUNK_ELEMENTS // shape.vocab), micro_rows * cfg.rollout.max_new_tokens)
    head = Term("log-prob head", 3 * 4 * positions * shape.vocab,
                f"3 x fp32 [{positions:,} positions x {shape.vocab:,} vocabulary] chunk", "train")
    return act, head, without, with_ckpt


def vision_term(cfg, shape: Shape, micro_groups: int, prompt_tokens: int) -> Term:
    """Activations the vision tower keeps for the backward of one training pass: an upper bound that
    takes every prompt token for an image token (see module doc)."""
    if not shape.vision_layers:
        return Term("vision tower activations", 0, "no vision tower", "train")
    if not shape.vision_trains:
        return Term("vision tower activations", 0, "vision tower frozen: nothing kept for its backward", "train")
    b = _bytes_of(cfg.strategy.precision)
    w, depth = shape.vision_width, shape.vision_layers
    rows = micro_groups if cfg.trainer.encode_prompts_once else micro_groups * cfg.rollout.n
    patches = rows * prompt_tokens * shape.patches_per_token
    layer = b * (10 * w + 4 * shape.vision_intermediate) + (6 * w if b == 2 else 0)
    without, with_ckpt = depth * layer * patches, depth * b * w * patches + layer * patches
    on = cfg.model.gradient_checkpointing
    return Term("vision tower activations" + (" (checkpointed)" if on else ""), with_ckpt if on else without,
                f"bound: {rows} prompt(s) x {prompt_tokens} tokens x {shape.patches_per_token} patches, {depth} blocks"
                f"; without / with checkpointing {human(without)} / {human(with_ckpt)}", "train")


def engine_term(cfg, shape: Shape, rollout_rows: int, seq: int, capacity: float) -> Term:
    """The rollout engine's memory on this GPU (see module doc)."""
    r = cfg.rollout
    if r.engine == "vllm":
        v = r.vllm
        if v.mode == "server":
            return Term("vLLM engine", 0, f"server mode: on other GPUs ({v.url or 'rollout.vllm.url'})", "rollout")
        asleep = v.sleep
        return Term("vLLM engine (weights + KV cache)", v.gpu_memory_utilization * capacity,
                    f"gpu_memory_utilization {v.gpu_memory_utilization} x capacity"
                    + ("; asleep while training" if asleep else "; resident while training (rollout.vllm.sleep off)"),
                    "rollout" if asleep else "both")
    b = _bytes_of(cfg.strategy.precision)
    kv = shape.layers * 2 * shape.kv_dim * rollout_rows * seq * b
    return Term("KV cache (HF generate)", kv,
                f"{shape.layers} layers x 2 x {shape.kv_dim} x {rollout_rows} rows x {seq} tokens x {b} B", "rollout")


def peak(terms: list[Term]) -> tuple[float, str]:
    """The larger of the training phase and the rollout phase, and which it is."""
    train = sum(t.bytes for t in terms if t.phase in ("both", "train"))
    rollout = sum(t.bytes for t in terms if t.phase in ("both", "rollout"))
    return (train, "training") if train >= rollout else (rollout, "rollout")


KNOBS = {
    "activations": "model.gradient_checkpointing=true, a smaller trainer.micro_batch_groups, shorter "
                   "rollout.max_new_tokens / data.max_prompt_tokens",
    "vision tower activations": "model.gradient_checkpointing=true, model.freeze=[vision], smaller images "
                                "(fewer image tokens)",
    "parameters": "strategy.name=fsdp2 (or deepspeed with zero_stage=3) over more GPUs, strategy.offload=all",
    "gradients": "model.lora.r / model.freeze (fewer trainable parameters), sharding over more GPUs",
    "optimizer state": "model.lora.r / model.freeze, sharding over more GPUs, strategy.offload",
    "master weights": "sharding over more GPUs, strategy.offload=optimizer (deepspeed)",
    "vLLM engine": "a lower rollout.vllm.gpu_memory_utilization, rollout.vllm.sleep=true",
    "KV cache": "fewer rollout.n or data.batch_size per GPU, shorter rollout.max_new_tokens",
    "KL reference model": "algorithm.kl_coef=0, or LoRA (the reference is the policy with its adapters off)",
    "all-gather buffer": "fixed by the architecture (its largest unit); more GPUs do not shrink it",
    "log-prob head": "fixed (one chunk of logits)",
}


def knobs_for(name: str) -> str:
    """The config keys that shrink a term, by its name."""
    return next((v for k, v in KNOBS.items() if name.startswith(k)), "")
