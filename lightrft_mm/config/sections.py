"""The config sections: one frozen dataclass each; every default and every field's one
documentation (its `help` metadata) live here."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lightrft_mm.algorithms import presets
from lightrft_mm.algorithms.presets import Preset
from lightrft_mm.errors import ConfigError, did_you_mean


def opt(default: Any, help: str, *, choices: tuple | None = None, low: float | None = None,
        high: float | None = None) -> Any:
    """A config field: its default, its one-place documentation and its allowed values."""
    meta = {"help": help, "choices": choices, "low": low, "high": high}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class LoraConfig:
    r: int = opt(0, "LoRA rank (0 = no LoRA: every weight of the unfrozen parts trains). With r > 0 every base "
                 "weight is frozen and only the low-rank adapters train (peft; `pip install 'lightrft_mm[lora]'`).",
                 low=0)
    alpha: float = opt(16.0, "LoRA scale numerator: the adapter's update is multiplied by alpha / r.", low=0.0)
    dropout: float = opt(0.0, "Dropout on the adapters' input in training (rollout and evaluation run without).",
                         low=0.0, high=1.0)
    target_modules: list = opt([], "Linear layers given adapters, by the last part of their name (e.g. [q_proj, "
                               "v_proj]); empty = every linear layer of `parts` except the output head.")
    parts: list = opt(["llm"], "Parts whose linear layers get adapters, any of: llm, projector, vision (the "
                      "vision / audio tower is left out unless named here).")


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = opt("tiny:qwen2_5_vl", "A local Hugging Face model folder, a Hugging Face Hub id "
                            "(ORG/NAME, e.g. Qwen/Qwen2.5-VL-7B-Instruct: downloaded into the Hub cache, HF_HUB_CACHE "
                            "or HF_HOME, by train; cached copy only with HF_HUB_OFFLINE=1), or tiny:<family> "
                            "(qwen2_vl, qwen2_5_vl, llava, llava_next, qwen2_audio, qwen2, qwen3_vl, qwen3_5, "
                            "qwen2_5_omni, internvl, gemma3) built offline with random weights.")
    revision: str = opt("", "Branch, tag or commit of a Hub id's model (empty = main); only for Hub ids.")
    tiny_tokenizer: str = opt("bpe", "Tokenizer of a tiny: model: bpe (small, trained on the fly, fast) "
                              "or qwen (the real 151k Qwen tokenizer; ~30x slower on CPU).",
                              choices=("bpe", "qwen"))
    trust_remote_code: bool = opt(False, "Allow model code from the model folder (only for folders you trust).")
    dtype: str = opt("float32", "dtype the weights are loaded in and checkpoints saved in. Training always keeps "
                     "fp32 master weights; strategy.precision sets the compute dtype (docs/distributed.md).",
                     choices=("float32", "bfloat16", "float16"))
    attn_implementation: str = opt("sdpa", "Attention kernels of the language model and towers: sdpa (PyTorch's), "
                                   "eager, or flash_attention_2 (GPU, `pip install flash-attn`; the varlen kernels for "
                                   "trainer.padding_free).", choices=("sdpa", "eager", "flash_attention_2"))
    gradient_checkpointing: bool = opt(False, "Recompute the activations of every decoder layer and vision / audio "
                                       "block in the backward instead of keeping them (less memory, about a third "
                                       "more compute in training; generation is unaffected).")
    freeze: list = opt([], "Parts whose weights stay fixed and get no optimizer state, any of: vision (the vision "
                       "/ audio tower without its projector), projector (the media-to-text projector), llm (the "
                       "language model with its embeddings and head). Counts are logged as params/<part>/*.")
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass(frozen=True)
class DataConfig:
    train: list = opt([], "Prepared shard folders (or .jsonl files) of training Samples.")
    eval: list = opt([], "Prepared shard folders (or .jsonl files) for held-out evaluation.")
    batch_size: int = opt(16, "Prompts per training step (each sampled rollout.n times).", low=1)
    weights: list = opt([], "Mixing weight of each data.train folder, in order (numbers >= 0): each "
                        "prompt of a batch comes from folder i with probability weights[i] / sum. "
                        "Empty = pool all folders, every sample equally likely.")
    max_prompt_tokens: int = opt(0, "Drop training samples whose prompt (chat template, text and media "
                                 "tokens, as the model's processor encodes it) is longer than this; "
                                 "the count is logged as data/filtered_long (0 = keep all).", low=0)
    eval_max_samples: int = opt(0, "Evaluate on at most this many held-out samples (0 = all).", low=0)
    synthetic: str = opt("", "Synthetic task (colors, moving_dot, higher_tone, geo3k_like) whose training and "
                         "held-out splits are generated into data.train[0] and data.eval[0] when those folders do "
                         "not exist yet (by rank 0 under torchrun). Empty = never generate.")
    system_prompt: str = opt("", "System message added to samples that have none (empty = none).")
    on_media_error: str = opt("skip", "A training sample whose media fails to decode: skip it (counted "
                              "in data/skipped_media) or fail the run.", choices=("skip", "fail"))
    allow_outside_media: bool = opt(False, "Accept shard rows whose media files resolve (symlinks followed) "
                                    "outside their shard's folder. Off by default, so that shards from "
                                    "someone else cannot make training read, or a remote reward send out, "
                                    "other files of this machine; turn on only for shards you trust.")


@dataclass(frozen=True)
class ImageConfig:
    max_pixels_guard: int = opt(100_000_000, "Refuse an image whose header declares more pixels than this, "
                                "before decoding it (decompression bombs).", low=1)


@dataclass(frozen=True)
class VideoConfig:
    backend: str = opt("auto", "Video decoder: decord, pyav, or auto (decord, then PyAV).",
                       choices=("auto", "decord", "pyav"))
    fps: float = opt(2.0, "Frames sampled per second of video (a part's own fps wins).", low=1e-3)
    max_frames: int = opt(32, "Most frames sampled from one video (a part's own max_frames wins).", low=1)
    use_audio: bool = opt(False, "Qwen2.5-Omni only: every video part also gives the model its audio track, "
                          "interleaved with the frames in 2 s chunks (the thinker's use_audio_in_video); a video "
                          "without an audio track is then an error.")


@dataclass(frozen=True)
class AudioConfig:
    max_seconds: float = opt(30.0, "Longest audio clip accepted, in seconds.", low=1e-3)
    on_too_long: str = opt("clip", "An audio clip over max_seconds: clip it to max_seconds or fail.",
                           choices=("clip", "fail"))


@dataclass(frozen=True)
class VLLMConfig:
    mode: str = opt("colocate", "colocate: the trainer starts the engine beside itself (same machine and devices, "
                    "with rollout.vllm.python) and stops it at the end; server: an engine you started with "
                    "`lightrft-mm vllm-serve MODEL` (other GPUs or nodes) at rollout.vllm.url.",
                    choices=("colocate", "server"))
    url: str = opt("", "server mode: the engine's address, e.g. http://10.0.0.2:8765.")
    python: str = opt("", "colocate: the Python of vLLM's environment (vLLM pins its own torch and "
                      "transformers). Empty = $LIGHTRFT_MM_VLLM_PYTHON, else this Python when it has vLLM, else "
                      ".venv-vllm/bin/python (built by `make vllm`).")
    port: int = opt(0, "colocate: the engine's port on 127.0.0.1 (0 = a free one).", low=0)
    dtype: str = opt("auto", "dtype of the engine's weights (auto = model.dtype).",
                     choices=("auto", "float32", "bfloat16", "float16"))
    gpu_memory_utilization: float = opt(0.3, "colocate: share of each GPU's memory the engine may take (weights "
                                        "+ KV cache); the rest is the trainer's.", low=0.01, high=1.0)
    tensor_parallel_size: int = opt(1, "colocate: GPUs the engine's tensor parallelism spans.", low=1)
    max_model_len: int = opt(0, "Longest prompt + completion the engine allocates KV cache for (0 = the model's).",
                             low=0)
    sleep: bool = opt(True, "colocate: the engine frees its memory while the trainer trains (vLLM sleep mode) "
                      "and wakes for the next rollout. GPU only: on CPU the engine keeps its memory (logged once).")
    timeout_s: float = opt(600.0, "Seconds one request to the engine (a rollout, a weight sync) or a colocated "
                           "engine's start may take before the run stops with an error naming the engine.", low=1.0)


@dataclass(frozen=True)
class RolloutConfig:
    engine: str = opt("hf", "Rollout engine: hf (transformers generate in the trainer, CPU or GPU) or vllm (a vLLM "
                      "engine in its own process, rollout.vllm; text, image, Qwen-VL video and Qwen2-Audio prompts).",
                      choices=("hf", "vllm"))
    n: int = opt(8, "Completions sampled per prompt (the GRPO group size).", low=2)
    max_new_tokens: int = opt(64, "Longest completion, in tokens.", low=1)
    temperature: float = opt(1.0, "Sampling temperature.", low=1e-3)
    top_p: float = opt(1.0, "Nucleus sampling mass (1.0 = off).", low=1e-3, high=1.0)
    top_k: int = opt(0, "Sample among the k most likely tokens (0 = off).", low=0)
    repetition_penalty: float = opt(1.0, "transformers' repetition penalty on tokens already in the sequence (> 1 "
                                    "discourages repeats; 1.0 = off). Sampling settings come only from rollout.*: "
                                    "a checkpoint's generation_config is never applied (docs/algorithms.md).",
                                    low=1e-3)
    fire_temperature: float = opt(0.0, "FIRE sampling: the first completion token is drawn at this temperature, "
                                  "the rest at rollout.temperature; log-probs (sampling, old, reference) use the "
                                  "same per-position temperatures. 0 = off.", low=0.0)
    fire_top_k: int = opt(0, "FIRE sampling: the hot first token is drawn among the k most likely tokens (0 = "
                          "rollout.top_k). FIRE pairs its high temperature with top-k; without either, validate "
                          "refuses it (a near-uniform draw over the whole vocabulary).", low=0)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)


@dataclass(frozen=True)
class RewardSpec:
    name: str = opt("", "Registered reward name (lightrft-mm rewards list), 'package.module:function', "
                    "'path/file.py:function', or an installed package's entry point (group lightrft_mm.rewards).")
    weight: float = opt(1.0, "Weight of this reward in the combined reward (see scoring.combine).")
    sources: list = opt([], "Route this reward to the samples whose `source` is in this list (e.g. [geo3k]); "
                        "empty = every sample. A source no training or eval sample has is an error.")
    timeout: float = opt(300.0, "Seconds this reward may spend on one step's batch; past it the completions it "
                         "has not scored get None (counted in reward/<name>/timeouts). 0 = no limit.", low=0.0)
    args: dict = opt({}, "Keyword arguments of a reward factory: e.g. {model: path} for scalar_rm / "
                     "generative_rm, {url: ...} for remote_rm, {max_length: 64} for overlong (`lightrft-mm "
                     "rewards list -v` lists each factory's args). A plain reward function takes none.")
    label: str = opt("", "Name of this reward in metrics and tables (default: the name; 'file.py:fn' gives "
                     "'fn'). Needed to list one reward twice.")


@dataclass(frozen=True)
class ScoringConfig:
    combine: str = opt("sum_then_normalize", "How the rewards combine: sum_then_normalize (weighted sum of the raw "
                       "rewards; the algorithm normalises it per group) or normalize_then_sum (each reward first "
                       "normalised within its group, (r - mean) / std, then the weighted sum; GDPO).",
                       choices=("sum_then_normalize", "normalize_then_sum"))
    fail_fast: bool = opt(False, "Stop the run with a RewardError when a reward raises, times out or returns a "
                          "bad value (default: that completion's reward is None, counted in reward/errors and "
                          "reward/timeouts, the first traceback logged).")


@dataclass(frozen=True)
class AlgorithmConfig:
    """The policy-gradient algorithm. `name` picks a preset that fills every field left unset;
    a field you set replaces the preset's value and nothing else (see docs/algorithms.md)."""

    name: str = opt("grpo", "Algorithm preset: sets the defaults of every other algorithm field (see "
                    "docs/algorithms.md); fields you set override it one by one. A field you set that has no "
                    "effect with the result is an error, unless it equals the preset's value.",
                    choices=tuple(presets.PRESETS))
    advantage: str = opt(Preset("advantage"), "Advantage estimator: group (reward minus group mean, over the "
                         "group std if scale_by_std), rloo (minus the mean of the other completions), "
                         "reinforce_pp (token returns whitened over the batch), reinforce_pp_baseline (group "
                         "mean subtracted, then the same), reinforce (the raw reward).", choices=presets.ADVANTAGES)
    scale_by_std: bool = opt(Preset("scale_by_std"), "group advantage: divide by the group std (false = Dr.GRPO).")
    loss: str = opt(Preset("loss"), "Policy loss: ppo (token ratio clip), gspo (one length-normalised ratio per "
                    "sequence), gmpo (geometric mean of token ratios, clipped in log space), cpgd (clipped "
                    "log-ratio policy gradient + drift_coef * KL(old || new)), pg (vanilla -A log pi).",
                    choices=presets.LOSSES)
    aggregation: str = opt(Preset("aggregation"), "How per-token terms become the loss: token-mean (all tokens "
                           "weigh the same), seq-mean-token-mean (each completion weighs the same), "
                           "seq-mean-token-sum (summed over the completion), seq-mean-token-sum-norm (summed, "
                           "divided by rollout.max_new_tokens; Dr.GRPO).", choices=presets.AGGREGATIONS)
    clip_eps: float = opt(Preset("clip_eps"), "Lower clip epsilon: ratio >= 1 - clip_eps (ppo, gspo); log-ratio "
                          ">= -clip_eps (gmpo); log-ratio >= log(1 - clip_eps) (cpgd).", low=0.0, high=1.0)
    clip_eps_high: float = opt(Preset("clip_eps_high"), "Upper clip epsilon (DAPO's clip-higher when above "
                               "clip_eps). Unset: clip_eps plus the preset's gap (0.08 dapo, 1e-4 gspo, else 0).",
                               low=0.0)
    dual_clip: float = opt(Preset("dual_clip"), "Dual-clip constant c > 1 (ppo, gspo): a negative advantage's loss "
                           "is capped at c * |A| however large the ratio (0 = off).", low=0.0)
    epochs: int = opt(Preset("epochs"), "Optimisation passes over each rollout batch. With 1 pass and 1 mini-batch "
                      "the ratio to the sampling policy is 1; later updates are off-policy and the clip acts.", low=1)
    mini_batches: int = opt(Preset("mini_batches"), "Optimizer steps per pass: the batch's prompt groups are split "
                            "into this many mini-batches.", low=1)
    kl_coef: float = opt(Preset("kl_coef"), "KL coefficient beta towards the frozen reference (the model after "
                         "warm-up). 0 = no KL term and no reference model.", low=0.0)
    kl_in: str = opt(Preset("kl_in"), "Where the KL goes: loss (beta * KL added to the loss, GRPO) or reward "
                     "(beta * KL of the sampling policy subtracted from the rewards before the advantages: "
                     "per token for reinforce_pp*, summed over the completion otherwise).", choices=("loss", "reward"))
    kl_estimator: str = opt(Preset("kl_estimator"), "KL estimator of d = logp - ref_logp: k1 = d, k2 = d^2 / 2, "
                            "k3 = exp(-d) - 1 + d.", choices=presets.KL_ESTIMATORS)
    kl_clamp: float = opt(Preset("kl_clamp"), "Clamp each token's KL estimate to [-kl_clamp, kl_clamp] (0 = no "
                          "clamp; k3 with 10 is the 'low-variance KL' of some frameworks).", low=0.0)
    kl_target: float = opt(Preset("kl_target"), "Adaptive KL controller (Ziegler et al. 2019): after each step, steer "
                           "kl_coef so the step's KL estimate (loss/kl) approaches this value (0 = fixed).", low=0.0)
    kl_horizon: int = opt(Preset("kl_horizon"), "Adaptive KL controller horizon, in completions: larger adapts "
                          "kl_coef more slowly.", low=1)
    drift_coef: float = opt(Preset("drift_coef"), "cpgd: weight of the policy-drift term KL(pi_old || pi).", low=0.0)
    dynamic_sampling: bool = opt(Preset("dynamic_sampling"), "DAPO dynamic sampling: drop prompt groups whose "
                                 "rewards are all equal and sample more prompts until the batch is full.")
    dynamic_sampling_max_batches: int = opt(Preset("dynamic_sampling_max_batches"), "Most rollout batches sampled "
                                            "per step to fill it; then train on what was kept (the kept fraction "
                                            "is logged as sampling/kept_fraction).", low=1)
    overlong_filter: bool = opt(Preset("overlong_filter"), "Leave completions cut at rollout.max_new_tokens "
                                "(no end-of-turn) out of the loss (DAPO); logged as completion/truncated.")
    reward_norm: str = opt(Preset("reward_norm"), "Normalise rewards to mean 0, std 1 before the advantages: over "
                           "the batch, or running statistics of the whole run; none = off.",
                           choices=presets.REWARD_NORMS)
    reward_clip: float = opt(Preset("reward_clip"), "Clip rewards (after normalisation) to [-c, c] (0 = off).",
                             low=0.0)
    adv_clip: float = opt(Preset("adv_clip"), "Clip advantages to [-c, c] (0 = off).", low=0.0)
    entropy_coef: float = opt(Preset("entropy_coef"), "Weight of the entropy bonus (keeps every answer sampled).",
                              low=0.0)
    high_entropy_ratio: float = opt(Preset("high_entropy_ratio"), "Train the policy term only on this fraction of "
                                    "the batch's tokens with the highest entropy (Wang et al. 2025 use 0.2); "
                                    "1 = every token.", low=0.0, high=1.0)
    tis_cap: float = opt(Preset("tis_cap"), "Truncated importance sampling: weight each token's policy term by "
                         "min(pi_old / pi_rollout, tis_cap), with pi_old recomputed by the trainer (0 = off; "
                         "matters when the rollout engine's log-probs differ from the trainer's).", low=0.0)

    def __post_init__(self):
        explicit = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                    if f.name != "name" and not isinstance(getattr(self, f.name), Preset)}
        if self.name not in presets.PRESETS:
            raise ConfigError(f"algorithm.name: {self.name!r} is not one of {', '.join(presets.PRESETS)}."
                              f"{did_you_mean(self.name, presets.PRESETS)}")
        for key, value in presets.resolve(self.name, explicit).items():
            object.__setattr__(self, key, value)
        object.__setattr__(self, "_explicit", explicit)

    def problems(self, cfg: "Config") -> list[str]:
        """Problems of the resolved algorithm with the rest of the config (see presets.problems)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "name"}
        found = presets.problems(self.name, self._explicit, values, batch_size=cfg.data.batch_size)
        if 0 < cfg.rollout.fire_temperature < 1e-3:
            found.append(f"rollout.fire_temperature: {cfg.rollout.fire_temperature!r} is too close to 0. Fix: "
                         "0 (off) or a temperature >= 1e-3, e.g. 2.0.")
        r = cfg.rollout
        if r.fire_temperature > 0 and not (r.fire_top_k or r.top_k):
            found.append(f"rollout.fire_top_k: FIRE (rollout.fire_temperature={r.fire_temperature!r}) would draw "
                         "the first token from the whole vocabulary, nearly uniformly. Fix: set rollout.fire_top_k "
                         "(the first token's candidates, e.g. 20) or rollout.top_k.")
        if r.fire_top_k and r.fire_temperature <= 0:
            found.append(f"rollout.fire_top_k: {r.fire_top_k} is set but FIRE is off. Fix: set "
                         "rollout.fire_temperature (e.g. 5.0), or remove rollout.fire_top_k.")
        return found


@dataclass(frozen=True)
class StrategyConfig:
    """How training runs on one or many processes (docs/distributed.md)."""

    name: str = opt("single", "Training strategy: single (one process), fsdp2 (PyTorch FSDP2 under torchrun: "
                    "each decoder layer, vision block, the vision tower, the projector and an untied input "
                    "embedding sharded as their own units) or deepspeed (DeepSpeed ZeRO under torchrun; pip install "
                    "'lightrft_mm[deepspeed]').", choices=("single", "fsdp2", "deepspeed"))
    device: str = opt("auto", "cpu, cuda, or auto (cuda when available). Under torchrun each rank takes the GPU "
                      "of its LOCAL_RANK.", choices=("auto", "cpu", "cuda"))
    precision: str = opt("fp32", "Compute precision. bf16 / fp16 compute in that dtype and keep fp32 master "
                         "weights and fp32 optimizer state (fp16 adds dynamic loss scaling; its skipped steps "
                         "are logged as train/skipped_steps; GPU only). model.dtype is the dtype weights are "
                         "loaded and saved in.", choices=("fp32", "bf16", "fp16"))
    zero_stage: int = opt(2, "DeepSpeed ZeRO stage: 1 (optimizer state sharded), 2 (+ gradients), 3 (+ "
                          "parameters). deepspeed only.", choices=(1, 2, 3))
    offload: str = opt("none", "Offload to CPU memory: none; optimizer (DeepSpeed: optimizer state and step on "
                       "the CPU); all (fsdp2: parameters, gradients and optimizer state; DeepSpeed: optimizer "
                       "and, with zero_stage 3, parameters). Not with single.",
                       choices=("none", "optimizer", "all"))
    timeout_s: float = opt(600.0, "Seconds a collective (all-reduce, all-gather, barrier) may wait for the other "
                           "ranks before the run stops with an error naming the rank: a rank that died or hangs "
                           "cannot stall the others forever.", low=1.0)


@dataclass(frozen=True)
class TrainerConfig:
    max_steps: int = opt(100, "GRPO steps (one rollout batch and one optimizer step each).", low=1)
    seed: int = opt(0, "Seed of the model init, data order and sampling.")
    micro_batch_groups: int = opt(0, "Prompt groups (n completions each) per forward/backward pass; the "
                                  "passes of a mini-batch accumulate into one optimizer step with the same "
                                  "result. Groups are bucketed by length, so each pass pads little. 0 = one "
                                  "pass per mini-batch. Lower it when activations do not fit in memory.", low=0)
    encode_prompts_once: bool = opt(True, "Encode each prompt once per group of n completions: one prefill "
                                    "(media included) whose KV cache is copied to the n completions, and "
                                    "one vision-feature pass per prompt in the training forward (gradients "
                                    "flow back through it). false: every completion re-encodes its own copy "
                                    "(slower, same numbers).")
    padding_free: bool = opt(False, "Training forwards (RL and warm-up) without padding: the rows of a pass run as "
                             "one packed sequence of their real tokens, position ids restarting in each row (Qwen's "
                             "M-RoPE ids per row), attention unable to cross rows (transformers' packed-sequence "
                             "masks). Same log-probs, no compute on padding; but with sdpa / eager the mask is dense, "
                             "so attention grows with the square of the whole pack: on a GPU use "
                             "model.attn_implementation=flash_attention_2 (varlen kernels). docs/performance.md.")
    output_dir: str = opt("runs/default", "Run folder: metrics.jsonl, curves.png, checkpoints.")
    lr: float = opt(1e-5, "AdamW learning rate.", low=0.0)
    adam_beta1: float = opt(0.9, "AdamW beta1.", low=0.0, high=1.0)
    adam_beta2: float = opt(0.999, "AdamW beta2 (0.99 reacts faster; steadier on tiny models).",
                            low=0.0, high=1.0)
    weight_decay: float = opt(0.0, "AdamW decoupled weight decay.", low=0.0)
    max_grad_norm: float = opt(1.0, "Clip the gradient norm to this (0 = no clipping).", low=0.0)
    eval_every: int = opt(0, "Greedy held-out evaluation every k steps (0 = only before and after).", low=0)
    save_every: int = opt(0, "Save a checkpoint every k steps (0 = only the final one): checkpoint-<k>, HF "
                          "weights plus the training state trainer.resume continues from.", low=0)
    keep_checkpoints: int = opt(0, "Keep only the newest k numbered checkpoints (older ones are deleted after "
                                "each save; checkpoint-final is always kept). 0 = keep all.", low=0)
    resume: str = opt("", "Continue a run from a checkpoint: 'auto' = the newest of output_dir (a fresh start "
                      "when it has none), or a checkpoint folder. Exact: the same metrics as an uninterrupted run "
                      "(model, optimizer, data position, RNG of every rank, KL controller, reward statistics); "
                      "the same strategy and number of processes as the run that wrote it.")
    max_bad_steps: int = opt(5, "Stop the run after this many steps in a row whose optimizer updates were all "
                             "skipped for a non-finite (NaN / inf) gradient norm (counted in train/skipped_steps; "
                             "the weights are never updated from them).", low=1)
    accuracy_reward: str = opt("exact_match", "Reward whose mean greedy held-out score is reported "
                               "as eval/accuracy (it need not be among the training rewards).")
    overwrite: bool = opt(False, "Replace the run an output_dir already holds (its checkpoints are deleted). "
                          "To continue it instead: trainer.resume=auto.")


@dataclass(frozen=True)
class WarmupConfig:
    steps: int = opt(0, "Supervised format warm-up steps before RL (0 = none). The targets are a "
                     "random one of each sample's `choices`, never its answer: only the format is taught.",
                     low=0)
    lr: float = opt(1e-3, "Learning rate of the warm-up.", low=0.0)
    batch_size: int = opt(16, "Samples per warm-up step.", low=1)
    template: str = opt("{answer}", "Completion text of a warm-up target; the text {answer} is replaced "
                       "by the drawn choice, so \\boxed{{answer}} gives \\boxed{red}.")


@dataclass(frozen=True)
class LoggingConfig:
    progress: bool = opt(True, "Show a progress bar with reward and ETA.")
    plot: bool = opt(True, "Write curves.png (reward and accuracy per step) into the run folder.")
    completions: int = opt(2, "Completions per step written to trajectories.jsonl (0 = none): a short text log; "
                           "logging.trajectories_every records whole groups.", low=0)
    backends: list = opt(["jsonl"], "Where every metric of metrics.jsonl also goes (rank 0, same names and steps), "
                         "any of: jsonl (metrics.jsonl, always on), tensorboard (event files in "
                         "<output_dir>/tensorboard/), wandb (a run in <output_dir>/wandb/: offline, no network, unless "
                         "WANDB_MODE is set or an API key is configured; `wandb sync` uploads it), mlflow (a local "
                         "store in <output_dir>/mlruns/, SQLite + artifacts: `mlflow ui --backend-store-uri "
                         "sqlite:///<output_dir>/mlruns/mlflow.db`). Each is an optional extra: pip install "
                         "'lightrft_mm[tensorboard]' (or [wandb], [mlflow]).")
    trajectories_every: int = opt(10, "Every this many steps, write trajectories/step-<step>.jsonl: each prompt group "
                                  "with its media, completions, per-token log-probs and entropies, each reward's "
                                  "score and the advantages (what `lightrft-mm view` shows; 0 = never). Costs one "
                                  "extra no-grad forward on those steps.", low=0)
    rollouts_every: int = opt(50, "Every this many steps, the backends other than jsonl get a sample of the "
                              "rollouts (4 prompt groups: image, prompt, each completion, its rewards and "
                              "advantage) as a W&B table, TensorBoard images and text, MLflow images and a table "
                              "(0 = never). Costs one extra no-grad forward on those steps.", low=0)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: list = field(default_factory=list)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
