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
      "model.name_or_path=tiny:qwen2_audio"], "tiny:qwen2_audio has a 2 s audio window (200 feature frames); "
     "vLLM 0.32's Qwen2-Audio takes only 3000"),
    (["rollout.engine=vllm", "rollout.vllm.python=/nonexistent/python"], "`make vllm`"),
])
def test_validate_refuses_what_the_vllm_engine_cannot_do(overrides, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, overrides)


def test_validate_names_the_families_for_one_vllm_cannot_serve(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3"}))
    with pytest.raises(ConfigError, match="model type 'gemma3' is not served by this engine. It serves: qwen2_vl, "
                                          "qwen2_5_vl, llava, llava_next, qwen2, qwen2_audio"):
        load_config(None, [f"model.name_or_path={tmp_path}", "rollout.engine=vllm", "rollout.vllm.mode=server",
                           "rollout.vllm.url=http://x:1"])


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


def test_qwen2_audio_weights_get_the_names_vllm_loads():
    from safetensors.torch import load

    model, _ = build_tiny("qwen2_audio", seed=0)
    state = model.state_dict()
    sent = {k: v for f in vllm.weight_files(iter(state.items()), model_type="qwen2_audio", dtype=torch.float32,
                                              lora_scaling=None) for k, v in load(f).items()}
    assert len(sent) == len(state)
    assert {k.split(".")[0] for k in sent} == {"audio_tower", "multi_modal_projector", "language_model"}
    assert "language_model.lm_head.weight" in sent and "language_model.model.norm.weight" in sent
    assert torch.equal(sent["audio_tower.conv1.weight"], state["model.audio_tower.conv1.weight"])


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A 2 s 8 fps mp4 (sampled at 4 fps: second_per_grid_ts 0.5), a 56x112 one (resized to the
    grid) and a 22.05 kHz stereo wav (resampled by the adapter)."""
    import numpy as np
    import soundfile as sf

    from lightrft_mm.datasets.synthetic_video import write_mp4

    root = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    write_mp4(root / "a.mp4", rng.integers(0, 256, (16, 84, 84, 3), dtype=np.uint8), fps=8)
    write_mp4(root / "b.mp4", rng.integers(0, 256, (12, 56, 112, 3), dtype=np.uint8), fps=4)
    t = np.arange(11025) / 22050
    sf.write(root / "c.wav", np.stack([np.sin(2 * np.pi * 700 * t)] * 2, axis=1).astype(np.float32), 22050)
    return root


def _video_prompt(adapter, root):
    from lightrft_mm.schema import Sample

    content = [{"type": "video", "video": str(root / "a.mp4"), "fps": 4}, {"type": "text", "text": "and"},
               {"type": "video", "video": str(root / "b.mp4")}]
    return adapter.encode_prompts([Sample.from_dict({"id": "v", "messages": [{"role": "user", "content": content}]})])


def test_the_engine_makes_the_trainers_video_patches_from_the_frames_sent(media):
    """What the client sends, decoded and processed as the engine does (its video processor),
    is the trainer's pixel_values_videos bit for bit, with its grids and second_per_grid_ts."""
    import numpy as np

    from lightrft_mm.rollout.vllm_media import QwenVideoProcessor, engine_media, prompt_media

    model, processor = build_tiny("qwen2_5_vl", seed=0)
    adapter = make_adapter(model, processor)
    enc = _video_prompt(adapter, media).encodings[0]
    assert enc.media["second_per_grid_ts"].tolist() == [0.5, 1.0]
    payload = json.loads(json.dumps(prompt_media(enc, adapter)))  # as it travels
    videos = engine_media(payload)["video"]
    assert [v.shape for v, _ in videos] == [(8, 84, 84, 3), (6, 84, 140, 3)]  # sampled, sized to the grid
    out = QwenVideoProcessor(adapter.image_processor)(
        [v for v, _ in videos], video_metadata=[m for _, m in videos], return_metadata=True, return_tensors="pt")
    assert torch.equal(out["pixel_values_videos"], enc.media["pixel_values_videos"])
    assert torch.equal(out["video_grid_thw"], enc.media["video_grid_thw"])
    tp = adapter.image_processor.temporal_patch_size
    seconds = torch.tensor([tp / m.sampled_fps for m in out["video_metadata"]], dtype=torch.float32)
    assert torch.equal(seconds, enc.media["second_per_grid_ts"])
    with pytest.raises(ValueError, match="does not sample frames"):
        QwenVideoProcessor(adapter.image_processor)([videos[0][0]], do_sample_frames=True)
    with pytest.raises(ValueError, match="mm_device_do_normalize=False"):
        QwenVideoProcessor(adapter.image_processor)([videos[0][0]], do_normalize=False)
    assert np.array_equal(videos[0][0][0], np.asarray(enc.raw["video"][0][0]))  # 84x84: not resampled


def test_audio_travels_exactly(media):
    import numpy as np

    from lightrft_mm.rollout.vllm_media import engine_media, prompt_media
    from lightrft_mm.schema import Sample

    model, processor = build_tiny("qwen2_audio", seed=0)
    adapter = make_adapter(model, processor)
    sample = Sample.from_dict({"id": "a", "messages": [{"role": "user", "content": [
        {"type": "audio", "audio": str(media / "c.wav")}, {"type": "text", "text": "high?"}]}]})
    enc = adapter.encode_prompts([sample]).encodings[0]
    (wave, rate), = engine_media(json.loads(json.dumps(prompt_media(enc, adapter))))["audio"]
    assert rate == 16000 and wave.dtype == np.float32
    assert np.array_equal(wave, enc.raw["audio"][0]) and len(wave) == 8000  # resampled once, by the trainer


def test_engine_positions_are_the_trainers_for_videos_images_and_text(media, image_paths):
    """The engine's M-RoPE rule (`vllm_worker.trainer_positions`, over vLLM's per-item grids)
    gives the position ids and decode offset the trainer's model computes (transformers'
    get_rope_index), for a prompt with an image and two videos, one of them longer in time
    than in space (where vLLM 0.32's own rule differs)."""
    from types import SimpleNamespace

    from lightrft_mm.rollout.vllm_worker import trainer_positions
    from lightrft_mm.schema import Sample

    model, processor = build_tiny("qwen2_5_vl", seed=0)
    adapter = make_adapter(model, processor)
    content = [{"type": "image", "image": image_paths[0]}, {"type": "text", "text": "then"},
               {"type": "video", "video": str(media / "a.mp4"), "fps": 4}, {"type": "text", "text": "and"},
               {"type": "video", "video": str(media / "b.mp4")}, {"type": "text", "text": "same?"}]
    batch = adapter.encode_prompts([Sample.from_dict({"id": "p", "messages": [{"role": "user", "content": content}]})])
    enc = batch.encodings[0]
    ids, types = enc.input_ids, enc.token_aligned["mm_token_type_ids"]
    want, delta = model.model.get_rope_index(
        ids[None], mm_token_type_ids=types[None], image_grid_thw=enc.media["image_grid_thw"],
        video_grid_thw=enc.media["video_grid_thw"], second_per_grid_ts=enc.media["second_per_grid_ts"])
    merge, tps = 2, model.config.vision_config.tokens_per_second
    items, grids = [], {1: iter(enc.media["image_grid_thw"].tolist()), 2: iter(enc.media["video_grid_thw"].tolist())}
    seconds = iter(enc.media["second_per_grid_ts"].tolist())
    for i in range(len(types)):
        kind = int(types[i])
        if kind and (i == 0 or int(types[i - 1]) != kind):
            t, h, w = next(grids[kind])
            items.append((i, t, h // merge, w // merge, next(seconds) * tps if kind == 2 else 1.0))
    engine = SimpleNamespace(iter_mm_grid_thw=lambda features: iter(items))
    got, got_delta = trainer_positions(engine, ids.tolist(), None)
    assert torch.equal(got, want[:, 0]) and got_delta == int(delta)
    assert len(items) == 3 and items[1][1] > max(items[1][2:4])  # the first video: 4 x 3 x 3 merged patches
