"""The vLLM engine's client without vLLM: what validate refuses, what happens when the engine
does not answer or answers wrongly (a scripted stand-in HTTP server), and the weight stream."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
import torch

from lightrft_mm.config import load_config
from lightrft_mm.errors import ConfigError, RolloutError
from lightrft_mm.models.tiny import build_tiny
from lightrft_mm.processors import make_adapter
from lightrft_mm.rollout import vllm
from lightrft_mm.rollout.hf import SamplingParams


@pytest.mark.parametrize("overrides, expected", [
    (["rollout.engine=vllm", "rollout.fire_temperature=2.0", "rollout.fire_top_k=20"],
     "rollout.fire_temperature: vLLM samples"),
    (["rollout.engine=vllm", "rollout.vllm.mode=server"], "rollout.vllm.url: '' is not an http"),
    (["rollout.engine=vllm", "rollout.vllm.url=http://x:1"], "rollout.vllm.url: only for mode=server"),
    (["rollout.vllm.timeout_s=5"], "rollout.vllm.timeout_s: set, but rollout.engine is hf"),
    (["rollout.engine=vllm", "rollout.vllm.mode=server", "rollout.vllm.url=http://x:1",
      "model.name_or_path=tiny:qwen2_audio"], "model type 'qwen2_audio' is not served"),
    (["rollout.engine=vllm", "rollout.vllm.python=/nonexistent/python"], "`make vllm`"),
])
def test_validate_refuses_what_the_vllm_engine_cannot_do(overrides, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, overrides)


def test_a_missing_vllm_gives_the_install_command(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no .venv-vllm here
    monkeypatch.delenv("LIGHTRFT_MM_VLLM_PYTHON", raising=False)
    monkeypatch.setattr(vllm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RolloutError, match="make vllm"):
        vllm.vllm_python("")


class _Scripted(BaseHTTPRequestHandler):
    """Answers as `server.script` says: ("late", seconds) | ("json", payload) | ("status", code)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _answer(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.seen.append((self.command, self.path, body))
        kind, value = self.server.script(self.command, self.path)
        if kind == "late":
            time.sleep(value)
            value, kind = {"outputs": []}, "json"
        code, payload = (value, {"error": "engine failed"}) if kind == "status" else (200, value)
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = _answer


@pytest.fixture
def scripted():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    server.seen = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_tiny("qwen2", seed=0)
    return model, make_adapter(model, processor)


def _client(server, adapter, timeout=1.0):
    return vllm.VLLMRolloutEngine(f"http://127.0.0.1:{server.server_address[1]}", adapter,
                                  SimpleNamespace(timeout_s=timeout, sleep=False), model_type="qwen2",
                                  dtype=torch.float32)


def _prompts(adapter):
    from lightrft_mm.schema import Sample

    return adapter.encode_prompts([Sample.from_dict({"id": "a", "messages": [{"role": "user", "content": "hi"}]})])


def test_an_engine_that_answers_late_stops_the_rollout_after_the_timeout(scripted, tiny):
    scripted.script = lambda method, path: ("late", 3.0)
    t = time.time()
    with pytest.raises(RolloutError, match=r"no answer within 1 s.*rollout.vllm.timeout_s"):
        _client(scripted, tiny[1]).generate(_prompts(tiny[1]), 2, SamplingParams(max_new_tokens=4))
    assert time.time() - t < 2.5


def test_nothing_listening_is_a_clear_error(tiny):
    engine = vllm.VLLMRolloutEngine("http://127.0.0.1:9", tiny[1], SimpleNamespace(timeout_s=1.0, sleep=False),
                                    model_type="qwen2", dtype=torch.float32)
    with pytest.raises(RolloutError, match="vllm-serve"):
        engine.health()


def test_wrong_completion_counts_and_engine_errors_are_refused(scripted, tiny):
    model, adapter = tiny
    prompts = _prompts(adapter)
    ids = prompts.encodings[0].input_ids.tolist()
    one = {"prompt_token_ids": ids, "completions": [{"token_ids": [5, adapter.eos_token_id], "logprobs": [-1.0, -2.0]}]}
    scripted.script = lambda m, p: ("json", {"outputs": [one]})
    with pytest.raises(RolloutError, match="returned 1 completions for prompt 0, not rollout.n=2"):
        _client(scripted, adapter).generate(prompts, 2, SamplingParams(max_new_tokens=4))
    scripted.script = lambda m, p: ("json", {"outputs": [{**one, "prompt_token_ids": ids[1:]}]})
    with pytest.raises(RolloutError, match="expanded prompt 0"):
        _client(scripted, adapter).generate(prompts, 1, SamplingParams(max_new_tokens=4))
    scripted.script = lambda m, p: ("status", 500)
    with pytest.raises(RolloutError, match="answered 500: engine failed"):
        _client(scripted, adapter).generate(prompts, 1, SamplingParams(max_new_tokens=4))
    scripted.script = lambda m, p: ("json", {"outputs": [one]})  # a well-formed answer is taken as is
    r = _client(scripted, adapter).generate(prompts, 1, SamplingParams(max_new_tokens=4))
    assert r.completion_ids.tolist() == [[5, adapter.eos_token_id]]
    assert r.sample_logps.tolist() == [[-1.0, -2.0]] and r.completion_mask.tolist() == [[1, 1]]


def test_a_sync_that_fails_midway_never_commits(scripted, tiny, monkeypatch):
    model, adapter = tiny
    monkeypatch.setattr(vllm, "CHUNK_BYTES", 4096)  # many files
    calls = []

    def script(method, path):
        calls.append(path)
        return ("status", 500) if method == "PUT" and len(calls) == 3 else ("json", {})

    scripted.script = script
    strategy = SimpleNamespace(engine_weights=lambda: iter(model.state_dict().items()), is_main=True,
                               barrier=lambda: None)
    with pytest.raises(RolloutError, match="answered 500"):
        _client(scripted, adapter).sync(strategy)
    assert not any(path == "/weights/commit" for path in calls)


def test_the_weight_stream_is_the_state_dict_in_files_with_vllm_names(monkeypatch):
    from safetensors.torch import load

    model, _ = build_tiny("llava", seed=0)
    state = model.state_dict()
    monkeypatch.setattr(vllm, "CHUNK_BYTES", 64 * 1024)
    files = list(vllm.weight_files(iter(state.items()), model_type="llava", dtype=torch.bfloat16, lora_scaling=None))
    assert len(files) > 3
    sent = {k: v for f in files for k, v in load(f).items()}
    assert len(sent) == len(state)
    for name, value in state.items():
        got = sent[vllm.engine_name(name, "llava")]
        assert torch.equal(got, value.to(torch.bfloat16) if value.is_floating_point() else value)
    assert any(k.startswith("model.vision_tower.vision_model.") for k in sent)


def test_lora_layers_are_sent_merged():
    """What the engine gets is a plain model computing what the LoRA policy computes."""
    pytest.importorskip("peft")
    from safetensors.torch import load

    from lightrft_mm.models.lora import apply_lora

    model, _ = build_tiny("qwen2", seed=0)
    apply_lora(model, load_config(None, ["model.lora.r=4"]).model.lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)  # a trained adapter (B starts at zero)
    files = list(vllm.weight_files(iter(model.state_dict().items()), model_type="qwen2", dtype=torch.float32,
                                   lora_scaling=16.0 / 4))
    sent = {k: v for f in files for k, v in load(f).items()}
    plain, _ = build_tiny("qwen2", seed=1)
    plain.load_state_dict(sent, strict=True)  # exactly the plain model's names
    ids = torch.randint(3, 200, (2, 12))
    with torch.no_grad():
        assert (plain.eval()(ids).logits - model.eval()(ids).logits).abs().max().item() <= 1e-5


def test_compact_prompt_collapses_each_placeholder_run():
    assert vllm.compact_prompt([1, 7, 7, 7, 2, 7, 3, 3], {7}) == [1, 7, 2, 7, 3, 3]
