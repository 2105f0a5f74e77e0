"""rollout.engine=vllm for the families added after the first six (`tiny:<family>` built by
`lightrft_mm.models.tiny_<family>`).

With the real engine (`make vllm`; skipped where no vLLM environment exists, unless
LIGHTRFT_MM_REQUIRE_VLLM=1, where they fail): one engine per served family, started from the
trainer's weights as `mode=colocate` starts it, on text, image and several-image prompts, and
video prompts with the frames and fps the trainer sampled (Qwen3-VL with its text timestamps;
Qwen2.5-Omni, which also gets audio prompts); greedy completions and log-probs equal the HF
engine's (<= 1e-5) before and after a weight sync, a sync of perturbed weights changes them and
syncing the originals back restores them exactly; sampled log-probs are those of the processed
distribution (suppression, temperature, top-k, top-p).

Without it: the prompts the client sends are the ones vLLM expands back to the trainer's
(InternVL's `<img>...</img>` span, Gemma 3's newline-wrapped image, Qwen3-VL's timestamped
video), Omni videos with their audio track are refused by the client, and `validate` refuses the
families vLLM 0.32 does not serve faithfully, saying why.
"""

from __future__ import annotations

import pytest
import torch

from lightrft_mm.config import load_config
from lightrft_mm.errors import ConfigError, RolloutError
from lightrft_mm.models import load_policy
from lightrft_mm.processors import make_adapter
from lightrft_mm.rollout.hf import SamplingParams
from lightrft_mm.rollout.vllm import FAMILIES, NOT_SERVED, VLLMRolloutEngine, start_engine
from lightrft_mm.rollout.vllm_media import gemma3_prompt, prompt_media, qwen3_video_prompt, span_prompt
from lightrft_mm.schema import Sample
from lightrft_mm.strategy import STRATEGIES
from tests.test_rollout import _processed_logps
from tests.test_vllm import GREEDY, _user, media_files, vllm_env  # noqa: F401 (fixtures)
from tests.test_vllm import test_greedy_matches_hf_and_a_weight_sync_takes_effect_exactly as _greedy_and_sync

# The new families vLLM 0.32 serves (each also in vllm.FAMILIES); the others are refused.
SERVED = ("qwen3_vl", "internvl", "qwen2_5_omni")
REFUSED = ("qwen3_5", "gemma3")


KINDS = {"qwen3_vl": {"image", "video"}, "internvl": {"image"}, "qwen2_5_omni": {"image", "audio", "video"}}


def _samples(image_paths, files=None, *, audio=False, video=False) -> list[Sample]:
    """Image, two-image and text rows; audio rows (1 s at 16 kHz; 0.6 s stereo at 22.05 kHz,
    resampled by the trainer, with the first one after it) and video rows from `files`."""
    audio = [] if not audio else [
        {"id": "tone", "messages": _user({"type": "audio", "audio": files["a16"]},
                                         {"type": "text", "text": "Is it high?"})},
        {"id": "tones", "messages": _user({"type": "audio", "audio": files["a22"]}, {"type": "text", "text": "or"},
                                          {"type": "audio", "audio": files["a16"]}, system="One word.")},
    ]
    audio += [] if not video else [
        # 4 of 8 fps (Omni: video_second_per_grid 0.5); the second video at the default 2 fps, resized to the grid.
        {"id": "video", "messages": _user({"type": "video", "video": files["v8"], "fps": 4},
                                          {"type": "text", "text": "Where does it move?"})},
        {"id": "image+video", "messages": _user({"type": "image", "image": image_paths[0]},
                                                {"type": "video", "video": files["v4"]},
                                                {"type": "text", "text": "Same colour?"})},
    ]
    rows = audio + [
        {"id": "one", "messages": _user({"type": "image", "image": image_paths[0]},
                                        {"type": "text", "text": "What colour?"})},
        {"id": "two", "messages": _user({"type": "image", "image": image_paths[1]}, {"type": "text", "text": "and"},
                                        {"type": "image", "image": image_paths[2]}, system="Answer with one word.")},
        {"id": "text", "messages": _user({"type": "text", "text": "How many shapes?"})},
    ]
    return [Sample.from_dict(r) for r in rows]


def _policy(family: str, *overrides: str):
    cfg = load_config(None, [f"model.name_or_path=tiny:{family}", *overrides])
    model, processor = load_policy(cfg.model, seed=0)
    return cfg, model, processor, make_adapter(model, processor)


# -- with the real engine -----------------------------------------------------------------------
@pytest.fixture(scope="module", params=SERVED)
def served(request, vllm_env, image_paths, media_files, tmp_path_factory):  # noqa: F811 (fixtures)
    """(model, adapter, strategy, engine, prompts) of one tiny family, the engine serving the
    prepared policy's weights."""
    family = request.param
    cfg, model, processor, adapter = _policy(family, "rollout.engine=vllm", f"rollout.vllm.python={vllm_env}",
                                             "rollout.vllm.max_model_len=1024", "rollout.vllm.timeout_s=600")
    strategy = STRATEGIES.get("single")(cfg.strategy, max_grad_norm=1.0)
    model, _ = strategy.prepare(model, lambda params: torch.optim.SGD(params, lr=0.0))
    engine = start_engine(cfg, model, processor, adapter, strategy, folder=tmp_path_factory.mktemp(family) / "engine",
                          seed=0, dtype="float32", model_type=model.config.model_type, lora_scaling=None)
    prompts = adapter.encode_prompts(_samples(image_paths, media_files, audio=family == "qwen2_5_omni",
                                              video=family in ("qwen2_5_omni", "qwen3_vl")))
    assert {k for e in prompts.encodings for k in e.raw} == KINDS[family]
    yield model, adapter, strategy, engine, prompts
    engine.close()


@pytest.mark.vllm
@pytest.mark.timeout(900)
def test_greedy_matches_hf_and_a_weight_sync_takes_effect_exactly(served):
    """test_vllm.py's check (HF parity before and after a perturbed sync, restored exactly) on these families."""
    _greedy_and_sync(served)


@pytest.mark.vllm
def test_sampled_logps_are_the_processed_distributions(served):
    model, adapter, strategy, engine, prompts = served
    sampling = SamplingParams(max_new_tokens=8, temperature=0.8, top_k=5, top_p=0.9)
    r = engine.generate(prompts, 4, sampling)
    real = r.completion_mask.bool()
    assert not torch.isin(r.completion_ids[real], torch.tensor(adapter.special_ids_to_suppress())).any()
    want = _processed_logps(model, adapter, r, sampling)
    assert (r.sample_logps - want)[real].abs().max().item() <= 1e-4
    groups = r.completion_ids.view(len(prompts.encodings), 4, -1)
    assert any(len({tuple(row.tolist()) for row in group}) > 1 for group in groups)  # n draws, not one copy


# -- without it ---------------------------------------------------------------------------------
def test_served_and_refused_families():
    assert set(SERVED) <= set(FAMILIES)
    for family in REFUSED:
        assert family not in FAMILIES and family in NOT_SERVED
        with pytest.raises(ConfigError, match=f"model type '{family}' is not served by this engine.*Why not "
                                              f"{family}: vLLM 0.32"):
            load_config(None, [f"model.name_or_path=tiny:{family}", "rollout.engine=vllm"])


def test_internvl_prompt_is_sent_with_one_context_token_per_image(image_paths):
    _, _, _, adapter = _policy("internvl")
    tok = adapter.tokenizer
    start, pad, end = tok.start_image_token_id, tok.context_image_token_id, tok.end_image_token_id
    for enc in adapter.encode_prompts(_samples(image_paths)).encodings:
        ids = enc.input_ids.tolist()
        sent = span_prompt(ids, start=start, pad=pad, end=end)
        images = len(enc.raw.get("image", []))
        assert sent.count(pad) == images and start not in sent and end not in sent
        # vLLM replaces each context token by `<img>` + that image's tokens + `</img>`: the trainer's prompt.
        spans = iter(ids[i:j + 1] for i, j in zip([k for k, t in enumerate(ids) if t == start],
                                                  [k for k, t in enumerate(ids) if t == end]))
        assert [t for s in sent for t in (next(spans) if s == pad else [s])] == ids
    assert span_prompt([start, pad, 7, end], start=start, pad=pad, end=end) == [start, pad, 7, end]  # not a span


def test_gemma3_prompt_is_sent_with_one_image_start_per_image(image_paths):
    _, _, processor, adapter = _policy("gemma3")
    tok = adapter.tokenizer
    boi, eoi = tok.convert_tokens_to_ids(tok.boi_token), tok.convert_tokens_to_ids(tok.eoi_token)
    soft = tok.convert_tokens_to_ids(tok.image_token)
    # vLLM replaces each `<start_of_image>` by the tokens of the processor's full image sequence.
    full = tok.encode(processor.full_image_sequence, add_special_tokens=False)
    for enc in adapter.encode_prompts(_samples(image_paths)).encodings:
        ids = enc.input_ids.tolist()
        sent = gemma3_prompt(ids, tok, boi=boi, eoi=eoi)
        images = len(enc.raw.get("image", []))
        assert sent.count(boi) == images and soft not in sent and eoi not in sent
        expanded = [t for s in sent for t in (full if s == boi else [s])]
        assert expanded == ids
    no_newlines = [5, boi, soft, eoi, 6]
    assert gemma3_prompt(no_newlines, tok, boi=boi, eoi=eoi) == no_newlines  # left for the engine's check


def test_omni_videos_with_their_audio_track_are_refused_by_the_client(media_files):  # noqa: F811 (fixture)
    from lightrft_mm.processors.adapter import PromptEncoding

    cfg, _, _, adapter = _policy("qwen2_5_omni")
    sample = Sample.from_dict({"id": "clip", "messages": _user({"type": "video", "video": media_files["v8"]},
                                                               {"type": "text", "text": "Where?"})})
    prompts = adapter.encode_prompts([sample])
    enc = prompts.encodings[0]
    # As the adapter marks a video encoded with its audio track (video.use_audio=true).
    prompts.encodings[0] = PromptEncoding(enc.input_ids, enc.token_aligned,
                                          {**enc.media, "use_audio_in_video": torch.ones(1, dtype=torch.bool)},
                                          enc.raw)
    engine = VLLMRolloutEngine("http://127.0.0.1:9", adapter, cfg.rollout.vllm, model_type="qwen2_5_omni_thinker",
                               dtype=torch.float32)
    with pytest.raises(RolloutError, match="videos with their audio track"):
        engine.generate(prompts, 1, GREEDY)


def test_qwen3_vl_video_prompt_is_sent_with_one_pad_per_video_and_its_times(image_paths, media_files):  # noqa: F811
    _, _, _, adapter = _policy("qwen3_vl")
    tok = adapter.tokenizer
    start, pad, end = tok.convert_tokens_to_ids(["<|vision_start|>", "<|video_pad|>", "<|vision_end|>"])
    sample = Sample.from_dict({"id": "iv", "messages": _user(
        {"type": "video", "video": media_files["v8"], "fps": 4}, {"type": "image", "image": image_paths[0]},
        {"type": "video", "video": media_files["v4"]}, {"type": "text", "text": "Same?"})})
    enc = adapter.encode_prompts([sample]).encodings[0]
    ids, grids = enc.input_ids.tolist(), enc.media["video_grid_thw"]
    sent, times = qwen3_video_prompt(ids, [int(g[0]) for g in grids], pad=pad, start=start, end=end, tokenizer=tok)
    assert sent.count(pad) == 2 and [len(t) for t in times] == [int(g[0]) for g in grids]
    # vLLM's expansion of each video pad (Qwen3VLMultiModalProcessor.get_video_repl), from the times
    # vLLM computes out of the metadata the client sends (frames_indices / fps, mean over a patch).
    media = prompt_media(enc, adapter, video_times=times)
    tp = adapter.image_processor.temporal_patch_size
    videos = iter(zip(media["videos"], grids))
    expanded = []
    for t in sent:
        if t != pad:
            expanded.append(t)
            continue
        video, grid = next(videos)
        seconds = [k / video["fps"] for k in video["frames_indices"]]
        seconds += seconds[-1:] * (-len(seconds) % tp)
        per_frame = int(grid[1] * grid[2]) // adapter.image_processor.merge_size ** 2
        for i in range(0, len(seconds), tp):
            expanded += tok.encode(f"<{(seconds[i] + seconds[i + tp - 1]) / 2:.1f} seconds>", add_special_tokens=False)
            expanded += [start] + [pad] * per_frame + [end]
    assert expanded == ids
    assert qwen3_video_prompt(ids[:ids.index(end)], [int(g[0]) for g in grids], pad=pad, start=start, end=end,
                              tokenizer=tok) is None  # cut inside the first video
