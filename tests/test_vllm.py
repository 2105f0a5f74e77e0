"""rollout.engine=vllm with the real engine (`make vllm` builds its environment; CI runs these).

One engine per family (tiny Qwen2.5-VL, Qwen2-VL, LLaVA, Qwen2-Audio, started from the trainer's
weights as `mode=colocate` starts it), on text, image, several-image, video (Qwen-VL: the
frames and fps the trainer sampled) and audio (Qwen2-Audio) prompts: greedy completions and
log-probs equal the HF engine's before and after a weight sync; a sync of perturbed weights
changes them and syncing the originals back restores them exactly; sampled log-probs are those
of the processed distribution. The colour
demo learns with it. Where no vLLM environment exists these skip, unless
LIGHTRFT_MM_REQUIRE_VLLM=1 (set by .ci/run), where they fail.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from lightrft_mm.config import load_config
from lightrft_mm.errors import RolloutError
from lightrft_mm.models import load_policy
from lightrft_mm.prepare import prepare_synthetic
from lightrft_mm.processors import make_adapter
from lightrft_mm.rollout.hf import HFRolloutEngine, SamplingParams
from lightrft_mm.rollout.vllm import start_engine, vllm_python
from lightrft_mm.schema import Sample
from lightrft_mm.strategy import STRATEGIES
from tests.test_distributed import torchrun
from tests.test_rollout import _processed_logps

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]
LOGP_ATOL = 1e-5


@pytest.fixture(scope="module")
def vllm_env():
    try:
        return vllm_python("")
    except RolloutError as e:
        if os.environ.get("LIGHTRFT_MM_REQUIRE_VLLM"):
            pytest.fail(f"LIGHTRFT_MM_REQUIRE_VLLM is set but: {e}")
        pytest.skip(f"no vLLM environment: {e}")


@pytest.fixture(scope="module")
def media_files(tmp_path_factory):
    """Two mp4s (2 s at 8 fps, 84x84; 3 s at 4 fps, 56x112: resized to the grid) and two wavs
    (1 s at 16 kHz; 0.6 s stereo at 22.05 kHz: resampled by the trainer)."""
    import soundfile as sf

    from lightrft_mm.datasets.synthetic_video import write_mp4

    root = tmp_path_factory.mktemp("vllm-media")
    rng = np.random.default_rng(0)
    files = {k: str(root / f"{k}.{ext}") for k, ext in (("v8", "mp4"), ("v4", "mp4"), ("a16", "wav"), ("a22", "wav"))}
    write_mp4(files["v8"], rng.integers(0, 256, (16, 84, 84, 3), dtype=np.uint8), fps=8)
    write_mp4(files["v4"], rng.integers(0, 256, (12, 56, 112, 3), dtype=np.uint8), fps=4)
    t16, t22 = np.arange(16000) / 16000, np.arange(13230) / 22050
    sf.write(files["a16"], (0.5 * np.sin(2 * np.pi * 440 * t16)).astype(np.float32), 16000)
    sf.write(files["a22"], np.stack([0.3 * np.sin(2 * np.pi * 1000 * t22)] * 2, axis=1).astype(np.float32), 22050)
    return files


def _user(*content, system=None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": list(content)}]


def _samples(family, image_paths, files) -> list[Sample]:
    text = {"id": "text", "messages": _user({"type": "text", "text": "How many shapes?"})}
    if family == "qwen2_audio":
        rows = [
            {"id": "tone", "messages": _user({"type": "audio", "audio": files["a16"]},
                                             {"type": "text", "text": "Is it high?"})},
            {"id": "tones", "messages": _user({"type": "audio", "audio": files["a22"]}, {"type": "text", "text": "or"},
                                              {"type": "audio", "audio": files["a16"]}, system="One word.")},
            text,
        ]
        return [Sample.from_dict(r) for r in rows]
    rows = [
        {"id": "one", "messages": _user({"type": "image", "image": image_paths[0]},
                                        {"type": "text", "text": "What colour?"})},
        {"id": "two", "messages": _user({"type": "image", "image": image_paths[1]}, {"type": "text", "text": "and"},
                                        {"type": "image", "image": image_paths[2]}, system="Answer with one word.")},
        text,
    ]
    if family in ("qwen2_vl", "qwen2_5_vl"):
        # 4 of 8 fps: second_per_grid_ts 0.5, not vLLM's default 1.0; the second video at the default 2 fps.
        rows += [
            {"id": "video", "messages": _user({"type": "video", "video": files["v8"], "fps": 4},
                                              {"type": "text", "text": "Where does it move?"})},
            {"id": "image+video", "messages": _user({"type": "image", "image": image_paths[0]},
                                                    {"type": "video", "video": files["v4"]},
                                                    {"type": "text", "text": "Same colour?"})},
        ]
    return [Sample.from_dict(r) for r in rows]


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen2_vl", "llava", "qwen2_audio"])
def served(request, vllm_env, image_paths, media_files, tmp_path_factory):
    """(model, adapter, strategy, engine, prompts) of one tiny family, the engine serving the
    prepared policy's weights."""
    family = request.param
    with pytest.MonkeyPatch.context() as mp:
        if family == "qwen2_audio":
            from lightrft_mm.models import tiny

            mp.setattr(tiny, "AUDIO_WINDOW_SECONDS", 30)  # vLLM 0.32 takes only Qwen2-Audio's 30 s window
        cfg = load_config(None, [f"model.name_or_path=tiny:{family}", "rollout.engine=vllm",
                                 f"rollout.vllm.python={vllm_env}", "rollout.vllm.max_model_len=1024",
                                 "rollout.vllm.timeout_s=300"])
        model, processor = load_policy(cfg.model, seed=0)
    adapter = make_adapter(model, processor)
    strategy = STRATEGIES.get("single")(cfg.strategy, max_grad_norm=1.0)
    model, _ = strategy.prepare(model, lambda params: torch.optim.SGD(params, lr=0.0))
    engine = start_engine(cfg, model, processor, adapter, strategy, folder=tmp_path_factory.mktemp(family) / "engine",
                          seed=0, dtype="float32", model_type=model.config.model_type, lora_scaling=None)
    prompts = adapter.encode_prompts(_samples(family, image_paths, media_files))
    kinds = {k for e in prompts.encodings for k in e.raw}
    assert kinds == {"qwen2_audio": {"audio"}, "llava": {"image"}}.get(family, {"image", "video"})
    yield model, adapter, strategy, engine, prompts
    engine.close()


GREEDY = SamplingParams(max_new_tokens=10, greedy=True)


def _assert_same_as_hf(rollouts, model, adapter, prompts):
    want = HFRolloutEngine(model, adapter).generate(prompts, 1, GREEDY)
    assert torch.equal(rollouts.completion_ids, want.completion_ids)
    assert torch.equal(rollouts.completion_mask, want.completion_mask)
    real = want.completion_mask.bool()  # the HF engine's padding holds -inf * 0 after an early EOS
    diff = (rollouts.sample_logps - want.sample_logps)[real].abs().max().item()
    print(f"max |vLLM - HF| greedy log-prob: {diff:.2e}")  # shown with -s
    assert diff <= LOGP_ATOL
    assert rollouts.texts == want.texts


def test_greedy_matches_hf_and_a_weight_sync_takes_effect_exactly(served):
    model, adapter, strategy, engine, prompts = served
    first = engine.generate(prompts, 1, GREEDY)
    _assert_same_as_hf(first, model, adapter, prompts)

    original = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    engine.sync(strategy)
    perturbed = engine.generate(prompts, 1, GREEDY)
    assert not torch.equal(perturbed.sample_logps, first.sample_logps)
    _assert_same_as_hf(perturbed, model, adapter, prompts)  # the engine serves the new weights, images included

    model.load_state_dict(original)
    engine.sync(strategy)
    again = engine.generate(prompts, 1, GREEDY)
    assert torch.equal(again.completion_ids, first.completion_ids)
    assert torch.equal(again.sample_logps, first.sample_logps)


def test_sampled_logps_are_the_processed_distributions(served):
    model, adapter, strategy, engine, prompts = served
    sampling = SamplingParams(max_new_tokens=8, temperature=0.8, top_k=5, top_p=0.9)
    r = engine.generate(prompts, 4, sampling)
    assert r.completion_ids.shape[0] == 4 * len(prompts.encodings)
    assert not engine.records_policy_logps  # the trainer recomputes the policy's own
    real = r.completion_mask.bool()
    suppressed = torch.tensor(adapter.special_ids_to_suppress())
    assert not torch.isin(r.completion_ids[real], suppressed).any()
    want = _processed_logps(model, adapter, r, sampling)
    assert (r.sample_logps - want)[real].abs().max().item() <= 1e-4
    groups = r.completion_ids.view(len(prompts.encodings), 4, -1)
    assert any(len({tuple(row.tolist()) for row in group}) > 1 for group in groups)  # n draws, not one copy


@pytest.mark.slow
def test_colour_demo_learns_with_the_vllm_engine(vllm_env, tmp_path):
    from lightrft_mm.trainer.loop import train

    cfg = load_config("recipes/demo/colors.yaml", [
        "rollout.engine=vllm", f"rollout.vllm.python={vllm_env}", f"trainer.output_dir={tmp_path / 'run'}",
        "logging.progress=false", "logging.plot=false"])
    summary = train(cfg)
    assert summary["before"] <= 0.5
    assert summary["after"] >= 0.8
    rows = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "weight_sync" in line]
    assert len(rows) == cfg.trainer.max_steps  # one sync per step


@pytest.mark.distributed
def test_two_ranks_under_zero3_sample_with_one_engine_and_sync_it(vllm_env, tmp_path, checkpoint_accuracy):
    """torchrun, 2 ranks, ZeRO-3: the main rank starts the engine, both ranks send their own
    prompts, and every step's weights (gathered one parameter at a time) reach it: the run's last
    greedy evaluation, sampled by the engine, equals the HF engine's on the final checkpoint."""
    data = prepare_synthetic("colors", tmp_path / "colors", n=16, seed=1)
    out = tmp_path / "run"
    proc = torchrun(["-m", "lightrft_mm", "train", "recipes/demo/colors.yaml", "strategy.name=deepspeed",
                     "strategy.zero_stage=3", "rollout.engine=vllm", f"rollout.vllm.python={vllm_env}",
                     "warmup.steps=20", "trainer.max_steps=3", "trainer.eval_every=0", "data.batch_size=8",
                     f"data.train=[{data}]", f"data.eval=[{data}]", f"trainer.output_dir={out}",
                     "logging.progress=false", "logging.plot=false"], timeout=800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    steps = [r for r in rows if "grad_norm" in r]
    assert len(steps) == 3 and all(r["time/weight_sync"] > 0 for r in steps)
    final = json.loads((out / "summary.json").read_text())
    assert checkpoint_accuracy(final["checkpoint"], [data], max_new_tokens=8)[0] == pytest.approx(final["after"])
