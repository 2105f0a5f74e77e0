"""tiny:qwen2_5_omni, the Qwen2.5-Omni thinker: the real class, every medium reaches the LM, mixed
left-padded batches (text, images, videos, audio, videos with their audio track) generate with
log-prob parity under the thinker's M-RoPE, encode once per group, pack, train, reload, learn."""

import json
from types import SimpleNamespace

import av
import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from lightrft_mm.config import VideoConfig, load_config
from lightrft_mm.datasets.synthetic_video import write_mp4
from lightrft_mm.errors import MediaError, ModelError
from lightrft_mm.models import load_pretrained
from lightrft_mm.models.logprobs import forward_logprobs
from lightrft_mm.models.processing import load_processor
from lightrft_mm.models.tiny import build_tiny
from lightrft_mm.processors import make_adapter
from lightrft_mm.processors.adapter import collate
from lightrft_mm.processors.qwen_omni import QwenOmniAdapter
from lightrft_mm.rollout.hf import HFRolloutEngine, SamplingParams
from lightrft_mm.schema import Sample
from tests.test_padding_free import decoder_tokens, ragged
from tests.test_shared import (  # noqa: F401  (run here with this module's `setup`)
    N, test_rollout_prefill_once_gives_the_same_completions_with_1_over_n_of_the_encoder_work,
    test_sampled_rollouts_keep_logprob_parity_with_the_trainer,
    test_training_forward_encodes_once_per_group_with_the_same_logps_and_gradients)

FAMILY = "qwen2_5_omni"


def write_clip(path, frames: np.ndarray, fps: int, signal: np.ndarray | None, rate: int = 16000) -> None:
    """An H.264 mp4 of `frames` with `signal` as its AAC audio track."""
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        audio = out.add_stream("aac", rate=rate)
        audio.layout = "mono"
        fmt, size = audio.codec_context.codec.audio_formats[0].name, audio.codec_context.frame_size or 1024
        padded = np.concatenate([signal, np.zeros(-len(signal) % size)]).astype(np.float32)
        for i in range(0, len(padded), size):
            frame = av.AudioFrame.from_ndarray(padded[None, i:i + size], format=fmt, layout="mono")
            frame.sample_rate, frame.pts = rate, i
            for packet in audio.encode(frame):
                out.mux(packet)
        for packet in audio.encode(None):
            out.mux(packet)
        for image in frames:
            for packet in video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in video.encode(None):
            out.mux(packet)


def tone(seconds: float, hz: float, rate: int = 16000) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * hz * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("omni")
    rng = np.random.default_rng(0)
    for name, shape in (("a.png", (84, 84, 3)), ("b.png", (56, 112, 3))):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / name)
    write_mp4(root / "v.mp4", rng.integers(0, 256, (4, 56, 56, 3), dtype=np.uint8), fps=2)
    # 3 s of video (3 temporal grids: two 2 s chunks) with 3 s of sound, of which the 2 s window is heard.
    write_clip(root / "va.mp4", rng.integers(0, 256, (6, 56, 56, 3), dtype=np.uint8), 2, tone(3.0, 440))
    sf.write(root / "t.wav", tone(1.0, 440), 16000)
    sf.write(root / "u.wav", tone(0.6, 880), 16000)
    return root


def row(sid: str, parts: list, text: str) -> Sample:
    return Sample.from_dict({"id": sid, "messages": [{"role": "user", "content": parts + [
        {"type": "text", "text": text}]}]})


def omni_samples(root, use_audio: bool) -> list[Sample]:
    """Rows of different lengths: image, video (with its sound when use_audio), audio, text only,
    image + audio, and an audio before a video (audio features in prompt order)."""
    image = lambda name: {"type": "image", "image": str(root / name)}  # noqa: E731
    audio = lambda name: {"type": "audio", "audio": str(root / name)}  # noqa: E731
    video = {"type": "video", "video": str(root / ("va.mp4" if use_audio else "v.mp4"))}
    return [row("i", [image("a.png")], "What colour is it?"), row("v", [video], "Watch the video."),
            row("a", [audio("t.wav")], "Listen."), row("t", [], "Say hi."),
            row("ia", [image("b.png"), audio("u.wav")], "Describe the image and the sound."),
            row("av", [audio("u.wav"), video], "Is the second tone higher?")]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_tiny(FAMILY)


def adapter_for(tiny, use_audio: bool) -> QwenOmniAdapter:
    model, processor = tiny
    return make_adapter(model, processor, video=VideoConfig(use_audio=use_audio))


@pytest.fixture(scope="module", params=[False, True], ids=["video", "video-with-audio"])
def setup(request, media, tiny):
    """For the reused encode-once tests of tests/test_shared.py."""
    model, _ = tiny
    adapter = adapter_for(tiny, request.param)
    return FAMILY, model, adapter, adapter.encode_prompts(omni_samples(media, request.param))


def test_tiny_is_the_real_thinker_and_every_medium_reaches_the_lm(tiny, media):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    model, processor = tiny
    assert type(model) is Qwen2_5OmniThinkerForConditionalGeneration
    assert model.config.model_type == "qwen2_5_omni_thinker"
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    adapter = adapter_for(tiny, True)
    assert isinstance(adapter, QwenOmniAdapter) and adapter.modalities == {"image", "video", "audio"}
    batch = adapter.encode_prompts(omni_samples(media, True))
    with torch.no_grad():
        base = model(**batch.model_inputs()).logits[:, -1]
        # input_features rows: u.wav (row ia), then row av's u.wav and the video's sound track.
        for key, rows, item in (("pixel_values", [0, 4], None), ("pixel_values_videos", [1, 5], None),
                                ("input_features", [5], -1)):
            inputs = batch.model_inputs()
            changed = inputs[key].clone()
            if item is None:
                changed += 0.5
            else:
                changed[item] += 0.5
            out = model(**(inputs | {key: changed})).logits[:, -1]
            moved = (out - base).abs().amax(-1) > 1e-6
            assert moved[rows].all(), key
            assert not moved[3], "the text-only row must not see the media"


def test_video_with_audio_interleaves_as_the_processor_does(tiny, media):
    from transformers import Qwen2_5OmniProcessor

    adapter = adapter_for(tiny, True)
    enc = adapter.encode_one(omni_samples(media, True)[1])
    text = adapter.tokenizer.decode(enc.input_ids)
    grid = enc.media["video_grid_thw"][0].tolist()
    hw = grid[1] * grid[2] // 4
    assert grid[0] == 3 and enc.media["feature_attention_mask"].sum().item() == 200  # 3 s video, 2 s heard
    layout = "<|vision_bos|><|audio_bos|>" + "<|VIDEO|>" * 2 * hw + "<|AUDIO|>" * 50 + "<|VIDEO|>" * hw
    assert layout + "<|audio_eos|><|vision_eos|>" in text
    # transformers' own rule, on grids and audio lengths of one and of several chunks.
    fake = SimpleNamespace(audio_bos_token="<|audio_bos|>", audio_eos_token="<|audio_eos|>", video_token="<|VIDEO|>",
                           audio_token="<|AUDIO|>", video_processor=SimpleNamespace(merge_size=2),
                           get_chunked_index=lambda idx, n: Qwen2_5OmniProcessor.get_chunked_index(None, idx, n))
    for t, n_audio, seconds in ((2, 25, 1.0), (3, 50, 1.0), (1, 80, 1.0), (5, 20, 0.5)):
        frames = 2 * t
        want = Qwen2_5OmniProcessor.replace_video_with_audio_token(
            fake, {"video_grid_thw": np.array([[t, 4, 6]]), "video_second_per_grid": [seconds]}, 0,
            {"num_audio_tokens": np.array([n_audio])}, 0, position_id_per_seconds=25, seconds_per_chunk=2.0)
        assert adapter._interleave(t, 2, 3, seconds, n_audio) == want, (t, frames, n_audio)


@pytest.mark.parametrize("use_audio", [False, True], ids=["video", "video-with-audio"])
def test_mixed_left_padded_batch_keeps_logprob_parity(tiny, media, use_audio):
    model, _ = tiny
    adapter = adapter_for(tiny, use_audio)
    prompts = adapter.encode_prompts(omni_samples(media, use_audio))
    lengths = prompts.attention_mask.sum(-1)
    assert len(set(lengths.tolist())) == len(lengths)  # every row of its own length: really left-padded
    torch.manual_seed(3)
    r = HFRolloutEngine(model, adapter).generate(prompts, 2, SamplingParams(max_new_tokens=10, temperature=0.9))
    assert r.completion_mask.sum() > 30 and len(r.texts) == 2 * len(lengths)
    for share in (True, False):
        logps, _ = forward_logprobs(model, r.prompts, r.completion_ids, r.completion_mask, temperature=0.9,
                                    share_media=share)
        assert ((logps - r.logps).abs() * r.completion_mask).max().item() <= 1e-4
    # Negative control: positions other than the thinker's (one flag off, or the video's time
    # scale doubled) change the log-probs: the check above can fail.
    wrong = collate(r.prompts.encodings, adapter.pad_token_id)
    if use_audio:
        wrong.media.pop("use_audio_in_video")
    else:
        wrong.media["video_second_per_grid"] = 2 * wrong.media["video_second_per_grid"]
    logps, _ = forward_logprobs(model, wrong, r.completion_ids, r.completion_mask, temperature=0.9)
    assert ((logps - r.logps).abs() * r.completion_mask).max().item() > 1e-4


@pytest.mark.parametrize("use_audio", [False, True], ids=["video", "video-with-audio"])
def test_packed_forward_equals_the_padded_one(tiny, media, use_audio):
    model, _ = tiny
    adapter = adapter_for(tiny, use_audio)
    prompts = adapter.encode_prompts(omni_samples(media, use_audio)).repeat(N, adapter.pad_token_id)
    ids, mask = ragged(prompts, adapter, seed=1)
    results = {}
    for packed in (False, True):
        model.zero_grad()
        seen, handle = decoder_tokens(model)
        try:
            logps, _ = forward_logprobs(model, prompts, ids, mask, packed=packed)
        finally:
            handle.remove()
        (logps * mask).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[packed] = logps.detach(), grads, sum(seen)
    (lp, grads, tokens), (lp_p, grads_p, tokens_p) = results[False], results[True]
    model.zero_grad()
    assert (lp_p - lp)[mask.bool()].abs().max().item() <= 1e-5
    assert grads.keys() == grads_p.keys()
    for name in grads:
        scale = max(1.0, grads[name].abs().max().item())
        torch.testing.assert_close(grads_p[name], grads[name], rtol=1e-4, atol=1e-6 * scale, msg=name)
    assert tokens_p == int(prompts.attention_mask.sum()) + int(mask.sum()) < tokens


def test_bad_media_are_clear_errors(tiny, media):
    with_sound, silent = adapter_for(tiny, True), adapter_for(tiny, False)
    no_track = row("s1", [{"type": "video", "video": str(media / "v.mp4")}], "Hi")
    with pytest.raises(MediaError, match=r"sample s1: video .*v.mp4 has no audio track.*video.use_audio=false"):
        with_sound.encode_prompts([no_track])
    literal = row("s2", [{"type": "image", "image": str(media / "a.png")}], "a <|AUDIO|> here")
    with pytest.raises(MediaError, match=r"sample s2: the prompt's media placeholders \(image, audio\)"):
        silent.encode_prompts([literal])
    short = tiny[1].feature_extractor.sampling_rate // 20
    sf.write(media / "short.wav", np.zeros(short, np.float32), 16000)
    with pytest.raises(MediaError, match="sample s3: the audio of .*short.wav is 0.050 s long"):
        silent.encode_prompts([row("s3", [{"type": "audio", "audio": str(media / "short.wav")}], "Hi")])
    # Videos with and without their sound in one batch: the thinker takes one flag per forward.
    mixed = collate([silent.encode_one(omni_samples(media, False)[1]),
                     with_sound.encode_one(omni_samples(media, True)[1])], silent.pad_token_id)
    with pytest.raises(ModelError, match="mixes videos with and without their audio track"):
        tiny[0](**mixed.model_inputs())


def test_checkpoint_reloads_with_transformers(tiny, media, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded, _ = load_pretrained(tmp_path)
    assert type(reloaded) is type(model)
    reproc = load_processor(tmp_path)  # torchvision-free: Qwen2_5OmniNoVideoProcessor with its saved settings
    assert type(reproc) is type(processor) and reproc.feature_extractor.feature_size == 32
    samples = omni_samples(media, True)
    batch = adapter_for(tiny, True).encode_prompts(samples)
    batch2 = make_adapter(reloaded, reproc, video=VideoConfig(use_audio=True)).encode_prompts(samples)
    assert torch.equal(batch.input_ids, batch2.input_ids)
    assert batch.media.keys() == batch2.media.keys()
    assert all(torch.equal(batch.media[k], batch2.media[k]) for k in batch.media)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch2.model_inputs()).logits, model(**batch.model_inputs()).logits)


@pytest.mark.parametrize("use_audio", [True, False], ids=["video-with-audio", "video"])
def test_one_step_trains_every_part_the_batch_uses(media, tmp_path, use_audio):
    """Image, video (va.mp4, with sound) and text rows: the audio tower trains exactly when
    video.use_audio gives the model the videos' sound (the flag reaches the trainer's adapter)."""
    samples = omni_samples(media, True)
    rows = []
    for i, s in enumerate([samples[0], samples[1], samples[3], samples[1]]):
        rows.append(json.dumps({"id": f"{s.id}-{i}", "answer": "red", "messages": [
            {"role": m.role, "content": [{k: v for k, v in vars(p).items() if v is not None} for p in m.content]}
            for m in s.messages]}))
    data = tmp_path / "omni.jsonl"
    data.write_text("\n".join(rows) + "\n")
    reward = tmp_path / "tokens.py"  # differs between any two different completions: every group has a gradient
    reward.write_text("def tokens(inputs):\n    return [float(sum(x.completion_ids) % 97) for x in inputs]\n")
    out = tmp_path / "run"
    cfg = load_config("recipes/demo/colors.yaml", [
        f"model.name_or_path=tiny:{FAMILY}", f"data.train=[{data}]", "data.eval=[]", "data.allow_outside_media=true",
        f"video.use_audio={str(use_audio).lower()}", "warmup.steps=0", "trainer.max_steps=1", "data.batch_size=4",
        "rollout.n=4", "rollout.max_new_tokens=6", "trainer.lr=1e-2", f"trainer.output_dir={out}",
        "logging.progress=false", "logging.plot=false", f"rewards=[{{name: '{reward}:tokens'}}]",
        "data.on_media_error=fail"])
    from lightrft_mm.trainer.loop import train

    before, _ = build_tiny(FAMILY, seed=0)
    train(cfg)
    after = dict(load_pretrained(out / "checkpoint-final")[0].named_parameters())
    still = sorted(n for n, p in before.named_parameters() if torch.equal(p.detach(), after[n].detach()))
    # The audio encoder's bos/eos embedding is a parameter its forward never uses (transformers 5.24).
    unused = ["model.audio_tower.audio_bos_eos_token.weight"]
    audio = sorted(n for n, _ in before.named_parameters() if n.startswith("model.audio_tower."))
    assert still == (unused if use_audio else audio)
