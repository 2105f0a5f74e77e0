"""`rollout.engine=vllm`: sample with a vLLM engine, in its own process (DESIGN §4).

vLLM pins its own torch and transformers, so the engine runs in vLLM's environment as
`lightrft-mm vllm-serve` (`rollout/vllm_server.py`), and this client talks to it over HTTP:

- `mode=colocate`: the trainer's main rank writes the policy to a model folder and starts the
  engine beside itself, on the same machine and devices (`rollout.vllm.python`), and stops it
  at the end; between rollouts the engine sleeps (GPU) so training gets the memory back.
- `mode=server`: the engine was started by you (other GPUs or nodes); `rollout.vllm.url`.

Every rank sends its own prompts; the engine serialises them. The prompt is the trainer's: its
token ids (each media span written as vLLM writes it before expanding it again from the media:
`vllm_media.engine_prompt`) and its media as the adapter decoded, sampled and sized them (images, video frames with
their fps, audio waveforms: `vllm_media`), and the engine's expanded prompt is checked equal to
the trainer's. The log-probs returned are those of the distribution sampled from (vLLM's
processed log-probs: suppression, repetition penalty, temperature, top-k, top-p); the trainer
recomputes the policy's own (`records_policy_logps = False`). After every optimizer step `sync` streams the
weights from the strategy one tensor at a time (ZeRO-3 / FSDP2 gathered per parameter, LoRA
merged), in files of at most `CHUNK_BYTES`, which the engine loads in place; loading resets its
prefix, encoder and multimodal caches.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

from lightrft_mm.errors import RolloutError
from lightrft_mm.rollout.hf import Rollouts, SamplingParams, completion_mask_from
from lightrft_mm.rollout.vllm_media import compact_prompt  # noqa: F401 (vllm.compact_prompt, as before)
from lightrft_mm.rollout.vllm_media import NO_VIDEO_FAMILIES, audio_window_problem, engine_prompt, prompt_media

log = logging.getLogger(__name__)

CHUNK_BYTES = 256 * 2**20  # weights per transferred file
# Model families vLLM serves that this engine has an adapter for (model_type of config.json).
# Qwen2.5-Omni: its thinker's model_type, and the family name of `tiny:qwen2_5_omni` / the whole model's.
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava", "llava_next", "qwen2", "qwen2_audio", "qwen3_vl", "internvl",
            "qwen2_5_omni_thinker", "qwen2_5_omni")
# Why vLLM 0.32 does not serve these families faithfully here (measured; DESIGN §10).
NOT_SERVED = {
    "qwen3_5": "vLLM 0.32's CPU Gated DeltaNet kernel takes only bfloat16 (\"CPU GDN attention requires BF16\", "
               "vllm/model_executor/layers/mamba/ops/cpu/gdn_attention.py), so its log-probs cannot match the "
               "trainer's float32 ones (and only linear-attention head dims that are multiples of 32)",
    "gemma3": "vLLM 0.32's CPU attention has no bidirectional attention over an image's soft tokens (Gemma 3's "
              "token_type_ids; an mm-prefix LM): its image prompts' log-probs differ from the trainer's by up to 0.03",
}
MEDIA = ("image", "video", "audio")  # the kinds of `PromptEncoding.raw` sent to the engine
PLACEHOLDERS = ("<|image_pad|>", "<|video_pad|>", "<image>", "<|AUDIO|>", "<|IMAGE|>", "<|VIDEO|>")
INSTALL = ("Fix: `make vllm` builds vLLM's environment in .venv-vllm (CPU), or pip install 'lightrft_mm[vllm]' "
           "in a Python of its own (GPU); then rollout.vllm.python=<that python>.")


def config_problems(cfg) -> list[str]:
    """What `validate` refuses about rollout.engine / rollout.vllm (with the fix)."""
    import dataclasses

    from lightrft_mm.strategy import model_type_of

    r, v = cfg.rollout, cfg.rollout.vllm
    if r.engine != "vllm":
        default = type(v)()
        return [f"rollout.vllm.{f.name}: set, but rollout.engine is {r.engine}. Fix: rollout.engine=vllm, or remove it."
                for f in dataclasses.fields(v) if getattr(v, f.name) != getattr(default, f.name)]
    problems = []
    family = model_type_of(cfg.model.name_or_path, cfg.model.revision)
    if family and family not in FAMILIES:
        why = f" Why not {family}: {NOT_SERVED[family]}." if family in NOT_SERVED else ""
        problems.append(f"rollout.engine=vllm: model type {family!r} is not served by this engine. It serves: "
                        f"{', '.join(FAMILIES)}.{why} Fix: rollout.engine=hf.")
    if family == "qwen2_audio" and (frames := _audio_frames(cfg.model.name_or_path, cfg.model.revision)) is not None:
        if problem := audio_window_problem(frames, cfg.model.name_or_path):
            problems.append(problem)
    if r.fire_temperature > 0:
        problems.append("rollout.fire_temperature: vLLM samples a request at one temperature, so FIRE needs the hf "
                        "engine. Fix: rollout.engine=hf, or rollout.fire_temperature=0.")
    if v.mode == "server" and not v.url.startswith(("http://", "https://")):
        problems.append(f"rollout.vllm.url: {v.url!r} is not an http(s) address; server mode needs the engine's. "
                        "Fix: start `lightrft-mm vllm-serve MODEL --host 0.0.0.0` and set rollout.vllm.url="
                        "http://HOST:8765, or rollout.vllm.mode=colocate.")
    if v.mode == "colocate":
        if v.url:
            problems.append("rollout.vllm.url: only for mode=server (a colocated engine's address is chosen by the "
                            "trainer). Fix: remove it, or rollout.vllm.mode=server.")
        try:
            vllm_python(v.python)
        except RolloutError as e:
            if v.python or os.environ.get("LIGHTRFT_MM_VLLM_PYTHON"):  # one named that is not there: a mistake
                problems.append(str(e))
            # else vLLM is not installed yet, like weights not downloaded yet: validate notes it, train refuses
    return problems


def _audio_frames(name_or_path: str, revision: str = "") -> int | None:
    """The feature window (frames) of a Qwen2-Audio model (folder, cached Hub id or tiny:) known
    without loading it, else None."""
    from lightrft_mm.models.hub import cached_file

    if name_or_path.startswith("tiny:"):
        from lightrft_mm.models import tiny

        return int(tiny.AUDIO_WINDOW_SECONDS * 100)  # Whisper features: hop 160 at 16 kHz
    try:
        path = cached_file(name_or_path, "preprocessor_config.json", revision or None)
        if path is None:
            return None
        extractor = json.loads(path.read_text())
        return int(extractor["nb_max_frames"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def vllm_python(configured: str) -> str:
    """The interpreter that runs a colocated engine: rollout.vllm.python, else
    $LIGHTRFT_MM_VLLM_PYTHON, else this Python when it has vLLM, else .venv-vllm/bin/python."""
    for candidate in (configured, os.environ.get("LIGHTRFT_MM_VLLM_PYTHON", "")):
        if candidate:
            if not Path(candidate).is_file():
                raise RolloutError(f"rollout.vllm.python: {candidate} does not exist. {INSTALL}")
            return candidate
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    local = Path(".venv-vllm/bin/python")
    if local.is_file():
        return str(local.absolute())  # not resolved: the venv is known by its own path
    raise RolloutError(f"rollout.engine=vllm: vLLM is not installed in {sys.executable} and no vLLM environment "
                       f"was found (rollout.vllm.python, $LIGHTRFT_MM_VLLM_PYTHON, .venv-vllm). {INSTALL}")


# Qwen2-Audio in vLLM loads the released checkpoints' names (no mapper for transformers 5's).
_QWEN2_AUDIO_NAMES = (("model.audio_tower.", "audio_tower."), ("model.multi_modal_projector.", "multi_modal_projector."),
                      ("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."))

# Qwen2.5-Omni's thinker: transformers 5's names, and the released checkpoints' (the whole model's
# `thinker.` part), which vLLM loads.
_OMNI_NAMES = (("model.audio_tower.", "thinker.audio_tower."), ("model.visual.", "thinker.visual."),
               ("model.language_model.", "thinker.model."), ("lm_head.", "thinker.lm_head."))


def engine_name(name: str, model_type: str) -> str:
    """A state-dict name of the training model as vLLM's loader expects it. LLaVA's CLIP tower
    and Gemma 3's SigLIP tower are `vision_tower.<layers>` in transformers 5 and
    `vision_tower.vision_model.<layers>` in vLLM;
    Qwen2-Audio's parts are `model.audio_tower.` ... in transformers 5 and `audio_tower.`,
    `language_model.model.` ... in vLLM (the released checkpoints' names)."""
    if model_type in ("llava", "llava_next", "gemma3") and name.startswith("model.vision_tower.") \
            and not name.startswith("model.vision_tower.vision_model."):
        return "model.vision_tower.vision_model." + name[len("model.vision_tower."):]
    if model_type in ("qwen2_audio", "qwen2_5_omni_thinker"):
        for old, new in _QWEN2_AUDIO_NAMES if model_type == "qwen2_audio" else _OMNI_NAMES:
            if name.startswith(old):
                return new + name[len(old):]
    return name


def weight_files(named, *, model_type: str, dtype: torch.dtype, lora_scaling: float | None):
    """Group `(name, tensor)` into safetensors files of about CHUNK_BYTES: yields `bytes`.
    Names are mapped for vLLM, LoRA layers merged (`W + scaling * B A`), values cast to `dtype`."""
    from safetensors.torch import save

    from lightrft_mm.models.lora import merged_stream

    if lora_scaling is not None:
        named = merged_stream(named, lora_scaling)
    chunk, size = {}, 0
    for name, value in named:
        value = (value.to(dtype) if value.is_floating_point() else value).contiguous()
        if any(value.data_ptr() == t.data_ptr() for t in chunk.values()):
            value = value.clone()  # tied weights: safetensors stores no shared memory
        chunk[engine_name(name, model_type)] = value
        size += value.numel() * value.element_size()
        if size >= CHUNK_BYTES:
            yield save(chunk)
            chunk, size = {}, 0
    if chunk:
        yield save(chunk)


class VLLMRolloutEngine:
    """`RolloutEngine` over a vLLM engine process (see the module docstring).

    Args:
        url: the engine's address.
        adapter: the model adapter that encoded the prompts.
        cfg: the `rollout.vllm` section.
        model_type: the policy's model_type (names of the synced weights).
        dtype: the dtype weights are sent in.
        lora_scaling: alpha / r when the policy has LoRA adapters (synced merged), else None.
        comm: the strategy (rank, collectives).
        process: the engine process this client started (colocate), stopped by `close`.
        seed: base of the per-request sampling seeds.
    """

    records_policy_logps = False  # vLLM returns the sampled distribution's log-probs only

    def __init__(self, url: str, adapter, cfg, *, model_type: str, dtype: torch.dtype, lora_scaling=None,
                 comm=None, process=None, seed: int = 0):
        self.url, self.adapter, self.cfg = url.rstrip("/"), adapter, cfg
        self.model_type, self.dtype, self.lora_scaling = model_type, dtype, lora_scaling
        self.comm, self.process, self.seed = comm, process, seed
        self.is_main = comm is None or comm.is_main
        tok = adapter.tokenizer
        vocab = tok.get_vocab()
        self.placeholder_ids = {vocab[t] for t in PLACEHOLDERS if t in vocab}
        self._suppress = adapter.special_ids_to_suppress()
        self._calls = 0
        self.sync_seconds = 0.0

    def _engine_prompt(self, ids: list[int], enc) -> tuple[list[int], list[list[float]] | None]:
        got = engine_prompt(ids, enc, self.model_type, self.adapter.tokenizer, self.placeholder_ids)
        if got is None:
            raise RolloutError("rollout.engine=vllm: a Qwen3-VL video prompt does not hold its videos as "
                               "<|vision_start|> + per temporal patch '<t seconds><|vision_start|>' + video pads + "
                               "<|vision_end|>, then <|vision_end|> (the adapter's form, which vLLM rebuilds). "
                               "Fix: keep those tokens out of the text and the chat template.")
        return got

    # -- transport -----------------------------------------------------------------------------
    def _request(self, method: str, path: str, body=None, *, raw: bytes | None = None,
                 timeout: float | None = None) -> dict:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        headers = {"Content-Type": "application/octet-stream" if raw is not None else "application/json"}
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        limit = self.cfg.timeout_s if timeout is None else timeout
        try:
            with urllib.request.urlopen(req, timeout=limit) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            try:
                detail = json.loads(detail).get("error", detail)
            except ValueError:
                pass
            raise RolloutError(f"vLLM engine at {self.url}{path} answered {e.code}: {detail}") from None
        except (urllib.error.URLError, TimeoutError, socket.timeout, ConnectionError) as e:
            reason = getattr(e, "reason", e)
            raise RolloutError(f"vLLM engine at {self.url}{path}: no answer within {limit:g} s ({reason}). Fix: "
                               "check that `lightrft-mm vllm-serve` runs there (its log), or raise "
                               "rollout.vllm.timeout_s.") from None

    def health(self, timeout: float | None = None) -> dict:
        return self._request("GET", "/health", timeout=timeout)

    # -- rollout -------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts, n: int, sampling: SamplingParams) -> Rollouts:
        """Sample n completions for each prompt; returns tokens, text and the sampling log-probs."""
        if sampling.first_temperature > 0:
            raise RolloutError("rollout.fire_temperature: vLLM samples a request at one temperature. "
                               "Fix: rollout.engine=hf for FIRE sampling.")
        requests, full_prompts = [], []
        for enc in prompts.encodings:
            if other := set(enc.raw) - set(MEDIA):
                raise RolloutError(f"rollout.engine=vllm: prompts with {', '.join(sorted(other))} media are not sent "
                                   f"to vLLM (it gets {', '.join(MEDIA)}). Fix: rollout.engine=hf.")
            if enc.raw.get("video") and self.model_type in NO_VIDEO_FAMILIES:
                raise RolloutError(f"rollout.engine=vllm: videos of {self.model_type} are not sent to vLLM (the "
                                   "trainer's adapter builds none it takes). Fix: rollout.engine=hf for video data "
                                   "with this model.")
            if "use_audio_in_video" in enc.media and bool(enc.media["use_audio_in_video"].any()):
                raise RolloutError("rollout.engine=vllm: videos with their audio track (video.use_audio) are not "
                                   "sent to vLLM (its interleaving is not checked against the trainer's). Fix: "
                                   "rollout.engine=hf, or video.use_audio=false.")
            ids = enc.input_ids.tolist()
            full_prompts.append(ids)
            sent, times = self._engine_prompt(ids, enc)
            requests.append({"prompt_token_ids": sent, **prompt_media(enc, self.adapter, video_times=times)})
        self._calls += 1
        rank = self.comm.rank if self.comm is not None else 0
        seed = (self.seed * 1_000_003 + self._calls * 10_007 + rank * 7_919_993) % 2**31  # GPU engines
        body = {"prompts": requests, "n": n, "suppress": self._suppress, "eos_token_id": self.adapter.eos_token_id,
                "sampling": {"max_tokens": sampling.max_new_tokens, "temperature": sampling.temperature,
                             "top_p": sampling.top_p, "top_k": sampling.top_k, "greedy": sampling.greedy,
                             "repetition_penalty": sampling.repetition_penalty, "seed": seed}}
        outputs = self._request("POST", "/generate", body)["outputs"]
        if len(outputs) != len(requests):
            raise RolloutError(f"vLLM engine at {self.url} returned {len(outputs)} prompts' completions for "
                               f"{len(requests)} prompts.")
        rows, logps = [], []
        for i, (out, ids) in enumerate(zip(outputs, full_prompts)):
            if out["prompt_token_ids"] != ids:
                raise RolloutError(f"vLLM expanded prompt {i} to {len(out['prompt_token_ids'])} tokens where the "
                                   f"trainer's has {len(ids)} (or different ones): the engine's processor does not "
                                   "match the trainer's. Fix: start the engine from the same model folder.")
            if len(out["completions"]) != n:
                raise RolloutError(f"vLLM engine at {self.url} returned {len(out['completions'])} completions "
                                   f"for prompt {i}, not rollout.n={n}.")
            for c in out["completions"]:
                rows.append(c["token_ids"][:sampling.max_new_tokens])
                logps.append(c["logprobs"][:sampling.max_new_tokens])
        width = max(1, max(len(r) for r in rows))
        pad = self.adapter.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        sample_logps = torch.zeros((len(rows), width), dtype=torch.float32)
        for r, (tokens, lp) in enumerate(zip(rows, logps)):
            ids[r, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            sample_logps[r, :len(lp)] = torch.tensor(lp, dtype=torch.float32)
        device = prompts.input_ids.device
        ids, sample_logps = ids.to(device), sample_logps.to(device)
        mask = completion_mask_from(ids, self.adapter.eos_token_id)
        ids = ids.masked_fill(mask == 0, pad)
        sample_logps = sample_logps * mask
        batch = prompts.repeat(n, pad).to(device)
        return Rollouts(batch, ids, mask, sample_logps.clone(), self.adapter.decode(ids), n, sample_logps)

    # -- weights and memory ----------------------------------------------------------------------
    def sync(self, strategy) -> None:
        """Send the strategy's current weights to the engine (every rank calls it: the gathers
        are collective; the main rank sends). The engine keeps its old weights unless every file
        arrived (one commit at the end)."""
        t = time.time()
        named = strategy.engine_weights()
        if not self.is_main:
            for _ in named:  # take part in each gather
                pass
            strategy.barrier()
            return
        files = []
        for i, data in enumerate(weight_files(named, model_type=self.model_type, dtype=self.dtype,
                                              lora_scaling=self.lora_scaling)):
            name = f"sync-{i:05d}.safetensors"
            self._request("PUT", f"/weights/{name}", raw=data)
            files.append(name)
        self._request("POST", "/weights/commit", {"files": files})
        self.sync_seconds = time.time() - t
        strategy.barrier()

    def metrics(self) -> dict:
        """Logged every step: seconds the last weight sync took (main rank)."""
        return {"time/weight_sync": self.sync_seconds}

    def sleep(self) -> None:
        """Free the engine's memory for training (colocate with rollout.vllm.sleep, GPU)."""
        if self.process is not None and self.cfg.sleep and self.is_main:
            self._request("POST", "/sleep", {})

    def close(self) -> None:
        """Stop the engine this client started (colocate): its whole process group, since vLLM's
        engine core and workers are processes of their own."""
        if self.process is None:
            return
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
                self.process.wait(timeout=wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # workers that outlived the server
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_engine(cfg, model, processor, adapter, strategy, *, folder: Path, seed: int, dtype: str,
                 model_type: str, lora_scaling) -> VLLMRolloutEngine:
    """The engine of `rollout.vllm` (colocate: written and started here; server: reached at its
    url), and a client on every rank. Collective."""
    v = cfg.rollout.vllm
    extractor = getattr(processor, "feature_extractor", None)
    if model_type == "qwen2_audio" and extractor is not None:
        if problem := audio_window_problem(int(extractor.nb_max_frames), cfg.model.name_or_path):
            raise RolloutError(problem)
    torch_dtype = getattr(torch, v.dtype if v.dtype != "auto" else dtype)
    process, url = None, v.url
    if v.mode == "colocate":
        url = ""
        if strategy.is_main:
            python = vllm_python(v.python)
            write_engine_folder(model, processor, strategy, folder, model_type=model_type, dtype=torch_dtype,
                                lora_scaling=lora_scaling)
            port = v.port or _free_port()
            url = f"http://127.0.0.1:{port}"
            process = _launch(python, folder, port, v, seed, torch_dtype)
        else:
            for _ in strategy.engine_weights():  # the main rank's folder gathers collectively
                pass
        url = strategy.gather(url)[0]
    engine = VLLMRolloutEngine(url, adapter, v, model_type=model_type, dtype=torch_dtype,
                               lora_scaling=lora_scaling, comm=strategy, process=process, seed=seed)
    if process is not None:
        _wait_ready(engine, process, folder)
    strategy.barrier()
    engine.health()
    if v.mode == "server":  # a colocated engine started from the prepared policy's weights already
        engine.sync(strategy)
    return engine


def write_engine_folder(model, processor, strategy, folder: Path, *, model_type, dtype, lora_scaling) -> None:
    """A model folder vLLM starts from: config, generation config, processor and the current
    weights (named for vLLM, LoRA merged), streamed one tensor at a time."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    hf = getattr(model, "module", model)
    config = copy.deepcopy(hf.config)
    config.dtype = dtype
    # vLLM picks its model class by this name (a tiny model built from a config has none; an
    # FSDP2-wrapped one's class is a subclass of the transformers one).
    config.architectures = [next(c.__name__ for c in type(hf).__mro__ if c.__module__.startswith("transformers."))]
    engine_config(config, model_type).save_pretrained(folder)
    processor.save_pretrained(folder)
    if model_type == "qwen2_5_omni_thinker":
        _name_tokens(folder / "tokenizer_config.json", processor, OMNI_TOKENS)
    for i, data in enumerate(weight_files(strategy.engine_weights(), model_type=model_type, dtype=dtype,
                                          lora_scaling=lora_scaling)):
        (folder / f"model-{i:05d}.safetensors").write_bytes(data)


def engine_config(config, model_type: str):
    """The config vLLM starts from. Qwen2.5-Omni's thinker is served by vLLM only as the whole
    model (`Qwen2_5OmniModel`, its processing reads `Qwen2_5OmniConfig.thinker_config`): the
    thinker's config goes inside one, without speech output (no talker weights are sent)."""
    if model_type != "qwen2_5_omni_thinker":
        return config
    from transformers import Qwen2_5OmniConfig

    whole = Qwen2_5OmniConfig(thinker_config=config.to_dict(), enable_audio_output=False)
    whole.architectures = ["Qwen2_5OmniModel"]
    whole.dtype = config.dtype
    return whole


# The tokens Qwen2_5OmniProcessor reads from its tokenizer by name (transformers 5.19, in vLLM's
# environment), as the released checkpoints' tokenizer_config.json names them.
OMNI_TOKENS = ("image_token", "audio_token", "video_token", "vision_bos_token", "vision_eos_token",
               "audio_bos_token", "audio_eos_token")


def _name_tokens(path: Path, processor, names) -> None:
    """Write the processor's `names` tokens into tokenizer_config.json where the saved tokenizer
    does not name them (a tokenizer built without them, as the tiny models')."""
    data = json.loads(path.read_text())
    named = data.setdefault("model_specific_special_tokens", {}) or {}
    for name in names:
        if name not in data and getattr(processor, name, None):
            data[name] = named[name] = getattr(processor, name)
    data["model_specific_special_tokens"] = named
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False))


def _launch(python: str, folder: Path, port: int, v, seed: int, dtype: torch.dtype) -> subprocess.Popen:
    cmd = [python, "-m", "lightrft_mm.rollout.vllm_server", str(folder), "--port", str(port),
           "--dtype", str(dtype).removeprefix("torch."), "--seed", str(seed),
           "--gpu-memory-utilization", str(v.gpu_memory_utilization),
           "--tensor-parallel-size", str(v.tensor_parallel_size), "--max-model-len", str(v.max_model_len),
           "--parent-pid", str(os.getpid())]
    if v.sleep:
        cmd.append("--sleep")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).parents[2]), env.get("PYTHONPATH")) if p)
    log.info("starting the vLLM engine: %s (log: %s)", " ".join(cmd), folder / "engine.log")
    with open(folder / "engine.log", "w") as log_file:  # the engine keeps its own handle
        return subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _wait_ready(engine: VLLMRolloutEngine, process: subprocess.Popen, folder: Path) -> None:
    deadline = time.time() + engine.cfg.timeout_s
    while time.time() < deadline:
        if process.poll() is not None:
            tail = (folder / "engine.log").read_text(errors="replace").strip().splitlines()[-15:]
            raise RolloutError("the vLLM engine exited while starting (code %s); the end of %s:\n%s"
                               % (process.returncode, folder / "engine.log", "\n".join(tail)))
        try:
            engine.health(timeout=2)
            return
        except RolloutError:
            time.sleep(1)
    engine.close()
    raise RolloutError(f"the vLLM engine did not start within rollout.vllm.timeout_s={engine.cfg.timeout_s:g} s "
                       f"(log: {folder / 'engine.log'}). Fix: raise rollout.vllm.timeout_s.")
