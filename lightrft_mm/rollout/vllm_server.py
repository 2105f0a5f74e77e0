"""`lightrft-mm vllm-serve MODEL`: a vLLM engine behind a small HTTP API, for the trainer's
`rollout.engine=vllm` (DESIGN §4).

It runs in vLLM's own Python environment (vLLM pins its own torch and transformers), started by
the trainer itself (`rollout.vllm.mode=colocate`: a child process on the trainer's machine) or
by you on other GPUs or nodes (`mode=server`, `rollout.vllm.url`). Besides the standard library,
vLLM and safetensors it imports only `vllm_shims`, `vllm_worker` and `vllm_media` (with
`processors.video`) of this package: the trainer's dependencies are not needed here. The media
of a prompt are those of `vllm_media.prompt_media`.

Endpoints (JSON unless said):
    GET  /health            -> {"model", "vocab_size", "sleep"}
    POST /generate          {"prompts": [{"prompt_token_ids", "images", "videos", "audios"}], "n",
                             "sampling": {...}, "suppress": [ids]} -> {"outputs": [{
                             "prompt_token_ids", "completions": [{"token_ids", "logprobs"}]}]}
    PUT  /weights/<file>    a safetensors file (bytes) staged for the next commit
    POST /weights/commit    {"files": [...]} -> loads them in place, resets the caches
    POST /sleep, /wake_up   free / restore the engine's memory between rollouts (GPU only)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

log = logging.getLogger("lightrft_mm.vllm_serve")
WORKER_EXTENSION = "lightrft_mm.rollout.vllm_worker.WeightSync"


def use_cpu_shims() -> bool:
    """The processor shims of `vllm_shims` in this process (the one that processes the prompts'
    media); where torchvision is absent every other process of the engine (vLLM starts several)
    loads them too, through the `vllm_cpu/sitecustomize.py` start-up hook. Returns True there."""
    from lightrft_mm.rollout import vllm_shims

    if not vllm_shims.install():
        return False
    folder = str(Path(__file__).with_name("vllm_cpu"))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (folder, os.environ.get("PYTHONPATH")) if p)
    return True


class Engine:
    """One `vllm.LLM` and the lock that serialises the trainer ranks' calls into it."""

    def __init__(self, model: str, *, dtype: str, max_model_len: int, gpu_memory_utilization: float,
                 tensor_parallel_size: int, seed: int, sleep: bool):
        self.no_torchvision = use_cpu_shims()
        import torch
        from vllm import LLM

        self.on_gpu = torch.cuda.is_available()
        if not self.on_gpu:
            # On CPU the engine core in this process (not a process of its own) measured 2.5x the
            # rollouts/s of a tiny VLM (bench/rollout.py), starts in 8 s instead of 20 and holds
            # half the memory.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.sleep_enabled = sleep and self.on_gpu
        if not self.on_gpu:
            # vLLM 0.32's CPU runner rewinds a seeded request's generator with set_offset, which
            # CPU generators lack (RuntimeError when a partial prefill is discarded): on CPU the
            # engine's own seed drives sampling and per-request seeds are not used.
            log.info("CPU engine: sampling follows the engine seed (--seed), not per-request seeds")
        if sleep and not self.on_gpu:
            log.info("rollout.vllm.sleep: vLLM has no sleep mode on CPU; the engine keeps its memory between rollouts")
        kwargs = dict(model=model, dtype=dtype, seed=seed, gpu_memory_utilization=gpu_memory_utilization,
                      tensor_parallel_size=tensor_parallel_size, logprobs_mode="processed_logprobs", runner="generate",
                      worker_extension_cls=WORKER_EXTENSION, enforce_eager=not self.on_gpu,
                      enable_sleep_mode=self.sleep_enabled, max_logprobs=1,
                      # Pixels rescaled and normalised by the processors on the CPU, as the trainer's
                      # are (vLLM's default moves that to the device, in other float arithmetic).
                      mm_device_do_normalize=False)
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        from lightrft_mm.rollout.vllm_media import NO_VIDEO_FAMILIES

        self.model_type = model_type = _model_type(model)
        if model_type in NO_VIDEO_FAMILIES:  # no dummy video at start-up either
            kwargs["limit_mm_per_prompt"] = {"video": 0}
        if model_type == "gemma3":
            from lightrft_mm.rollout.vllm_worker import follow_gemma3_newlines

            follow_gemma3_newlines()
        if model_type == "internvl" and self.no_torchvision:
            from lightrft_mm.rollout.vllm_worker import follow_internvl_without_video

            follow_internvl_without_video()
        self.model = model
        self.llm = LLM(**kwargs)
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()
        self.lock = threading.Lock()
        self.staging = Path(tempfile.mkdtemp(prefix="lightrft-vllm-weights-", dir=_shm()))
        self.asleep = False

    def generate(self, body: dict) -> dict:
        from vllm import SamplingParams

        from lightrft_mm.rollout.vllm_media import engine_media, processor_kwargs

        s, n = body["sampling"], int(body["n"])
        suppress = set(body.get("suppress", []))
        allowed = [i for i in range(self.vocab_size) if i not in suppress] if suppress else None
        params = SamplingParams(
            n=n, max_tokens=int(s["max_tokens"]), temperature=0.0 if s["greedy"] else float(s["temperature"]),
            top_p=float(s["top_p"]), top_k=int(s["top_k"]) or -1, repetition_penalty=float(s["repetition_penalty"]),
            seed=s.get("seed") if self.on_gpu else None, logprobs=0, allowed_token_ids=allowed,
            stop_token_ids=[int(body["eos_token_id"])], ignore_eos=False, skip_special_tokens=False, detokenize=False)
        prompts = []
        for p in body["prompts"]:
            prompt = {"prompt_token_ids": [int(t) for t in p["prompt_token_ids"]]}
            media = engine_media(p)
            if media:
                prompt["multi_modal_data"] = media
            if kwargs := processor_kwargs(p, self.model_type):
                prompt["mm_processor_kwargs"] = kwargs
            prompts.append(prompt)
        with self.lock:
            self._awake()
            results = self.llm.generate(prompts, params, use_tqdm=False)
        outputs = []
        for r in results:
            completions = []
            for c in r.outputs:
                logps = [step[t].logprob for t, step in zip(c.token_ids, c.logprobs)]  # the sampled token's
                completions.append({"token_ids": list(c.token_ids), "logprobs": logps})
            outputs.append({"prompt_token_ids": list(r.prompt_token_ids), "completions": completions})
        return {"outputs": outputs}

    def stage(self, name: str, data: bytes) -> None:
        if "/" in name or not name.endswith(".safetensors"):
            raise ValueError(f"weights file name {name!r}: expected a bare *.safetensors name")
        (self.staging / name).write_bytes(data)

    def commit(self, files: list[str]) -> dict:
        paths = [str(self.staging / f) for f in files]
        missing = [f for f, p in zip(files, paths) if not os.path.exists(p)]
        if missing:
            raise ValueError(f"weights files never sent: {missing}")
        t = time.time()
        with self.lock:
            self._awake()
            counts = self.llm.collective_rpc("lightrft_load_files", args=(paths,))
            # Everything computed from the old weights: cached prefixes, vision / audio encoder
            # outputs (the scheduler's record of them too, else the next image request fails
            # with "Encoder cache miss") and processed media.
            self.llm.reset_prefix_cache()
            self.llm.llm_engine.reset_encoder_cache()
            self.llm.reset_mm_cache()
        for p in paths:
            os.unlink(p)
        return {"tensors": counts[0], "seconds": round(time.time() - t, 4)}

    def sleep(self) -> dict:
        with self.lock:
            if self.sleep_enabled and not self.asleep:
                self.llm.sleep(level=1)
                self.asleep = True
        return {"asleep": self.asleep}

    def wake(self) -> dict:
        with self.lock:
            self._awake()
        return {"asleep": False}

    def _awake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def close(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def _model_type(model: str) -> str:
    """The model_type of a model folder's config.json ("" for a Hub id or an unreadable one)."""
    try:
        return json.loads((Path(model) / "config.json").read_text()).get("model_type", "")
    except (OSError, ValueError):
        return ""


def _exit_with_parent(pid: int, engine: Engine) -> None:
    """A colocated engine outlives no trainer: when the trainer process is gone, stop the
    engine's whole process group (vLLM's engine core and workers included)."""
    while True:
        time.sleep(2)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            log.warning("the trainer (pid %d) is gone: stopping the engine", pid)
            engine.close()
            if os.getpgrp() == os.getpid():
                os.killpg(os.getpgrp(), signal.SIGKILL)
            os._exit(1)


def _shm() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def make_handler(engine: Engine):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # one line per request at debug level, not stderr noise
            log.debug(fmt, *args)

        def _reply(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        def _run(self, fn) -> None:
            try:
                self._reply(200, fn())
            except (ValueError, KeyError, TypeError) as e:  # a bad request (vLLM rejects inputs with ValueError)
                log.warning("request refused", exc_info=True)
                self._reply(400, {"error": f"{type(e).__name__}: {e}"})
            except Exception as e:  # the engine failed: say so to the trainer, keep serving
                log.exception("request failed")
                self._reply(500, {"error": f"{type(e).__name__}: {e}"})

        def do_GET(self):
            if self.path == "/health":
                self._reply(200, {"model": engine.model, "vocab_size": engine.vocab_size,
                                  "sleep": engine.sleep_enabled})
            else:
                self._reply(404, {"error": f"no endpoint {self.path}"})

        def do_PUT(self):
            if self.path.startswith("/weights/"):
                name, data = self.path[len("/weights/"):], self._body()
                self._run(lambda: engine.stage(name, data) or {"staged": name})
            else:
                self._reply(404, {"error": f"no endpoint {self.path}"})

        def do_POST(self):
            routes = {"/generate": lambda b: engine.generate(b), "/weights/commit": lambda b: engine.commit(b["files"]),
                      "/sleep": lambda b: engine.sleep(), "/wake_up": lambda b: engine.wake()}
            if self.path not in routes:
                self._reply(404, {"error": f"no endpoint {self.path}"})
                return
            raw = self._body()
            self._run(lambda: routes[self.path](json.loads(raw or b"{}")))

    return Handler


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lightrft-mm vllm-serve", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="Hugging Face model folder the engine starts from (the trainer then syncs its "
                                 "weights before the first rollout)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for other nodes)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-model-len", type=int, default=0, help="0 = the model's")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sleep", action="store_true", help="allow /sleep between rollouts (GPU only)")
    p.add_argument("--parent-pid", type=int, default=0, help="exit when this process ends (a trainer that "
                                                             "started this engine, rollout.vllm.mode=colocate)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; only read by the CPU backend
    try:
        import vllm  # noqa: F401
    except ImportError:
        sys.exit("lightrft-mm vllm-serve: vLLM is not installed in this Python "
                 f"({sys.executable}). Fix: `make vllm` (CPU) or pip install 'lightrft_mm[vllm]' (GPU).")
    engine = Engine(args.model, dtype=args.dtype, max_model_len=args.max_model_len,
                    gpu_memory_utilization=args.gpu_memory_utilization,
                    tensor_parallel_size=args.tensor_parallel_size, seed=args.seed, sleep=args.sleep)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(engine))
    if args.parent_pid:
        threading.Thread(target=_exit_with_parent, args=(args.parent_pid, engine), daemon=True).start()
    log.info("serving %s on http://%s:%d", args.model, args.host, server.server_address[1])
    print(f"lightrft-mm vllm-serve: ready on http://{args.host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    finally:
        engine.close()


if __name__ == "__main__":
    main()
