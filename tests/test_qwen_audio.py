"""Qwen2-Audio: adapter (decode, clip/fail, start/end, placeholders), parity, training, checkpoints,
and the `higher_tone` synthetic task."""

import copy

import numpy as np
import pytest
import torch

from lightrft_mm.config import AudioConfig
from lightrft_mm.errors import MediaError
from lightrft_mm.models.logprobs import forward_logprobs
from lightrft_mm.models.tiny import build_tiny
from lightrft_mm.processors import make_adapter
from lightrft_mm.processors.qwen_audio import Qwen2AudioAdapter
from lightrft_mm.rollout.hf import HFRolloutEngine, SamplingParams
from lightrft_mm.schema import Sample

SR = 16000
FRAMES_PER_SECOND = 100  # Whisper features: hop 160 at 16 kHz


def _tone(freq, seconds, rate=SR, amp=0.5):
    t = np.arange(int(round(seconds * rate))) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture(scope="module")
def wavs(tmp_path_factory):
    """WAV files: 1 s at 16 kHz, 0.5 s stereo at 22.05 kHz, 3 s (over the 2 s window), and
    1 s of 300 Hz followed by 1 s of 2 kHz (for start/end)."""
    import soundfile as sf

    root = tmp_path_factory.mktemp("wavs")
    paths = {name: str(root / f"{name}.wav") for name in ("one", "stereo", "long", "two_tones")}
    sf.write(paths["one"], _tone(440, 1.0), SR)
    sf.write(paths["stereo"], np.stack([_tone(880, 0.5, 22050)] * 2, axis=1), 22050)
    sf.write(paths["long"], _tone(300, 3.0), SR)
    sf.write(paths["two_tones"], np.concatenate([_tone(300, 1.0), _tone(2000, 1.0)]), SR)
    return paths


def _sample(sid, *parts, system=None):
    content = []
    for p in parts:
        if isinstance(p, dict):
            content.append({"type": "audio", **p})
        elif p.endswith(".wav"):
            content.append({"type": "audio", "audio": p})
        else:
            content.append({"type": "text", "text": p})
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    return Sample.from_dict({"id": sid, "messages": messages, "answer": "higher", "choices": ["higher", "lower"]})


@pytest.fixture(scope="module")
def mixed_samples(wavs):
    """One clip, text only, two clips (one cut by start/end), a resampled stereo clip with a system prompt."""
    return [
        _sample("one", wavs["one"], "Is the tone high?"),
        _sample("text", "How many shapes are in the image? Count them."),
        _sample("two", wavs["stereo"], "and", {"audio": wavs["long"], "start": 0.5, "end": 1.3}),
        _sample("sys", "Listen", wavs["stereo"], system="Answer with one word."),
    ]


@pytest.fixture(scope="module")
def tiny_audio():
    torch.manual_seed(0)
    return build_tiny("qwen2_audio")


def test_tiny_qwen2_audio_is_small_with_a_short_window(tiny_audio):
    model, processor = tiny_audio
    assert type(model).__name__ == "Qwen2AudioForConditionalGeneration"
    assert sum(p.numel() for p in model.parameters()) < 500_000
    extractor = processor.feature_extractor
    assert extractor.feature_size == model.config.audio_config.num_mel_bins
    assert extractor.nb_max_frames == 2 * model.config.audio_config.max_source_positions == 2 * FRAMES_PER_SECOND
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "audio"}, {"type": "audio"},
                                                                       {"type": "text", "text": "hi"}]}],
                                         add_generation_prompt=True, tokenize=False)
    assert "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nAudio 2: <|audio_bos|><|AUDIO|><|audio_eos|>\nhi" in text
    assert type(make_adapter(model, processor)) is Qwen2AudioAdapter


def test_encoding_decodes_resamples_cuts_and_counts_audio_tokens(tiny_audio, mixed_samples, wavs):
    model, processor = tiny_audio
    adapter = make_adapter(model, processor)
    batch = adapter.encode_prompts(mixed_samples)
    features, mask = batch.media["input_features"], batch.media["feature_attention_mask"]
    assert features.shape == (4, model.config.audio_config.num_mel_bins, 200)
    # 1 s; 0.5 s at 22.05 kHz resampled; 0.8 s cut by start/end; the stereo clip again.
    assert mask.sum(1).tolist() == [100, 50, 80, 50]
    audio_id = model.config.audio_token_id
    # 25 audio tokens per second of audio (two stride-2 steps over 100 frames/s).
    assert (batch.input_ids == audio_id).sum(1).tolist() == [25, 0, 12 + 20, 12]
    # start/end picks the second half of two_tones: its energy sits in the 2 kHz mel bins.
    cut = adapter.encode_one(_sample("cut", {"audio": wavs["two_tones"], "start": 1.0, "end": 2.0}))
    head = adapter.encode_one(_sample("head", {"audio": wavs["two_tones"], "end": 1.0}))
    loud = lambda enc: int(enc.media["input_features"][0, :, :100].mean(1).argmax())  # noqa: E731
    assert loud(cut) > loud(head) + 5


def test_audio_config_clip_versus_fail(tiny_audio, wavs):
    model, processor = tiny_audio
    long = _sample("long-7", wavs["long"])
    one = _sample("one-7", wavs["one"])
    frames = lambda cfg, s: int(make_adapter(model, processor, audio=cfg).encode_one(s)  # noqa: E731
                                .media["feature_attention_mask"].sum())
    assert frames(AudioConfig(), long) == 200  # clipped to the model's 2 s window
    assert frames(AudioConfig(max_seconds=0.5), one) == 50
    with pytest.raises(MediaError, match=r"sample long-7 .*hears at most 2 s.*on_too_long=fail"):
        frames(AudioConfig(on_too_long="fail"), long)
    with pytest.raises(MediaError, match=r"sample one-7: .*max_seconds=0.5"):
        frames(AudioConfig(max_seconds=0.5, on_too_long="fail"), one)
    assert frames(AudioConfig(max_seconds=1.5, on_too_long="fail"), one) == 100


def test_bad_audio_samples_raise_media_errors_naming_them(tiny_audio, wavs, image_paths, tmp_path):
    model, processor = tiny_audio
    adapter = make_adapter(model, processor)
    with pytest.raises(MediaError, match=r"sample lit-1: .*2 '<\|AUDIO\|>' placeholder\(s\).*1 audio part"):
        adapter.encode_one(_sample("lit-1", wavs["one"], "what is <|AUDIO|>?"))
    with pytest.raises(MediaError, match="sample lit-2"):
        adapter.encode_one(_sample("lit-2", "no audio <|AUDIO|>"))
    with pytest.raises(MediaError, match=r"sample short-1: .*0.050 s long after start/end"):
        adapter.encode_one(_sample("short-1", {"audio": wavs["one"], "start": 0.2, "end": 0.25}))
    image = Sample.from_dict({"id": "img-1", "messages": [{"role": "user", "content": [
        {"type": "image", "image": image_paths[0]}, {"type": "text", "text": "hi"}]}]})
    with pytest.raises(MediaError, match="sample img-1: .*image/video parts"):
        adapter.encode_one(image)
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF not really")
    with pytest.raises(MediaError, match="sample broken-1"):
        adapter.encode_one(_sample("broken-1", str(broken)))


def _rollouts(model, processor, samples):
    adapter = make_adapter(model, processor)
    prompts = adapter.encode_prompts(samples)
    assert (prompts.attention_mask == 0).any()  # mixed lengths: the batch is left-padded
    torch.manual_seed(0)
    return HFRolloutEngine(model, adapter).generate(prompts, 2, SamplingParams(max_new_tokens=10, temperature=0.9))


def test_the_audio_reaches_the_model_and_logps_agree(tiny_audio, mixed_samples):
    model, processor = tiny_audio
    r = _rollouts(model, processor, mixed_samples)
    logps, _ = forward_logprobs(model, r.prompts, r.completion_ids, r.completion_mask, temperature=0.9)
    diff = ((logps - r.logps).abs() * r.completion_mask).max().item()
    assert diff <= 1e-4, f"max |logp_gen - logp_train| = {diff}"
    assert r.completion_mask.sum() > 20
    with torch.no_grad():
        inputs = r.prompts.model_inputs()
        logits = model(**inputs).logits[:, -1]
        inputs["input_features"] = torch.zeros_like(inputs["input_features"])
        silent = model(**inputs).logits[:, -1]
    audio_rows = (r.prompts.input_ids == model.config.audio_token_id).any(1)
    changed = (logits - silent).abs().amax(1) > 1e-6
    assert torch.equal(changed, audio_rows)  # text-only rows do not depend on the audio


def test_one_training_step_changes_every_trainable_parameter(tiny_audio, mixed_samples):
    model, processor = tiny_audio
    model = copy.deepcopy(model)
    r = _rollouts(model, processor, mixed_samples)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    logps, _ = forward_logprobs(model, r.prompts, r.completion_ids, r.completion_mask, temperature=0.9)
    advantages = torch.linspace(-1, 1, logps.shape[0])[:, None]
    (-(logps * advantages * r.completion_mask).sum() / r.completion_mask.sum()).backward()
    optimizer.step()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) > 50
    unchanged = [n for n in trainable if torch.equal(dict(model.named_parameters())[n], before[n])]
    assert not unchanged, f"parameters a step left unchanged: {unchanged}"
    # Only Whisper's fixed sinusoidal positions are frozen.
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == [
        "model.audio_tower.embed_positions.weight"]


def test_checkpoint_reloads_with_equal_logits(tmp_path, mixed_samples):
    from transformers import AutoModelForMultimodalLM

    from lightrft_mm.models.processing import load_processor

    model, processor = build_tiny("qwen2_audio", seed=3)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = AutoModelForMultimodalLM.from_pretrained(tmp_path).eval()
    reprocessor = load_processor(tmp_path)
    assert type(reloaded) is type(model) and type(reprocessor) is type(processor)
    batch = make_adapter(model, processor).encode_prompts(mixed_samples)
    batch2 = make_adapter(reloaded, reprocessor).encode_prompts(mixed_samples)
    assert torch.equal(batch.input_ids, batch2.input_ids)
    assert torch.equal(batch.media["input_features"], batch2.media["input_features"])
    with torch.no_grad():
        assert torch.equal(model(**batch.model_inputs()).logits, reloaded(**batch2.model_inputs()).logits)


def test_higher_tone_is_balanced_deterministic_and_true_to_its_audio(tmp_path):
    import soundfile as sf

    from lightrft_mm.datasets.synthetic import generate

    samples = generate("higher_tone", 12, 5, tmp_path / "a")
    again = generate("higher_tone", 12, 5, tmp_path / "b")
    other = generate("higher_tone", 12, 6, tmp_path / "c")
    assert [s.to_dict() for s in samples] == [s.to_dict() for s in again]
    assert [s.meta for s in samples] != [s.meta for s in other]
    assert sorted(s.answer for s in samples) == ["higher"] * 6 + ["lower"] * 6
    for s in samples:
        assert s.choices == ["higher", "lower"] and "\\boxed{higher}" in s.prompt_text()
        path = tmp_path / "a" / s.media("audio")[0].audio
        assert sf.read(path)[0].tobytes() == sf.read(tmp_path / "b" / s.media("audio")[0].audio)[0].tobytes()
        audio, rate = sf.read(path, dtype="float32")
        assert rate == SR and len(audio) == SR
        # The dominant frequency of each half is the tone the metadata names.
        for half, key in ((audio[:SR // 2], "f1"), (audio[SR // 2:], "f2")):
            spectrum = np.abs(np.fft.rfft(half))
            assert abs(np.argmax(spectrum) * SR / len(half) - s.meta[key]) < 6
        assert (s.meta["f2"] > s.meta["f1"]) == (s.answer == "higher")


def test_higher_tone_needs_both_tones(tmp_path):
    """No threshold on one tone's pitch gets near the answers: the task asks for a comparison."""
    from lightrft_mm.datasets.synthetic_audio import higher_tone

    samples = higher_tone(400, 0, tmp_path)
    higher = np.array([s.answer == "higher" for s in samples])
    for key, ceiling in (("f2", 0.82), ("f1", 0.62)):
        pitch = np.array([s.meta[key] for s in samples])
        best = max(max(np.mean((pitch > t) == higher), np.mean((pitch <= t) == higher)) for t in pitch)
        assert best <= ceiling, (key, best)
