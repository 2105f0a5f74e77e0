"""Log-probs and entropies in bounded memory: the output head is applied a chunk of positions
at a time (checkpointed under autograd), never to the whole [N, T] at once, with the same values
and gradients as the full fp32 log-softmax."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lightrft_mm.models import logprobs
from lightrft_mm.models.logprobs import forward_logprobs, head_logprobs, sequence_inputs
from lightrft_mm.schema import Sample


def reference(hidden, head, tokens, temps):
    logits = head(hidden).float() / temps
    logps = torch.log_softmax(logits, dim=-1)
    return logps.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), -(logps.exp() * logps).sum(-1)


def test_chunks_give_the_full_log_softmax_and_its_gradients():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(3, 5, 16, requires_grad=True)
    tokens = torch.randint(0, 50, (3, 5))
    temps = torch.tensor([2.0, 1.0, 1.0, 0.7, 1.0])  # FIRE-like per-position temperatures
    want_lp, want_ent = reference(hidden, head, tokens, temps.view(1, -1, 1))
    (want_lp.sum() + want_ent.sum()).backward()
    want_grads = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad = head.weight.grad = None
    lp, ent = head_logprobs(hidden, head, tokens, temps, with_entropy=True, entropy_grad=True, chunk_tokens=4)
    torch.testing.assert_close(lp, want_lp, atol=1e-6, rtol=0)
    torch.testing.assert_close(ent, want_ent, atol=1e-6, rtol=0)
    (lp.sum() + ent.sum()).backward()
    torch.testing.assert_close(hidden.grad, want_grads[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(head.weight.grad, want_grads[1], atol=1e-6, rtol=0)


def test_entropy_that_only_selects_tokens_carries_no_gradient():
    head = torch.nn.Linear(8, 20)
    hidden = torch.randn(2, 3, 8, requires_grad=True)
    tokens = torch.zeros(2, 3, dtype=torch.long)
    _, selecting = head_logprobs(hidden, head, tokens, with_entropy=True, entropy_grad=False)
    _, bonus = head_logprobs(hidden, head, tokens, with_entropy=True, entropy_grad=True)
    assert not selecting.requires_grad and bonus.requires_grad
    torch.testing.assert_close(selecting, bonus.detach())


class LargestVocabTensor(TorchDispatchMode):
    """Records the most elements of any fp32 activation whose last dimension is the vocabulary
    (the head's [H, V] weight transpose and its gradient are parameter-sized, not counted)."""

    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.vocab, self.hidden, self.largest = vocab, hidden, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if (isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.dim() >= 2
                    and t.shape[-1] == self.vocab and tuple(t.shape) != (self.hidden, self.vocab)):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava", "qwen2"])
def test_training_forward_matches_the_full_logits_and_never_holds_them(family, image_samples, monkeypatch):
    from lightrft_mm.models.tiny import build_tiny
    from lightrft_mm.processors import make_adapter

    model, processor = build_tiny(family, seed=0)
    adapter = make_adapter(model, processor)
    samples = image_samples if family != "qwen2" else [
        Sample.from_dict({"id": f"t{i}", "messages": [{"role": "user", "content": "hi " * (i + 1)}], "answer": "a"})
        for i in range(3)]
    prompts = adapter.encode_prompts(samples).repeat(2, adapter.pad_token_id)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 60, (prompts.input_ids.shape[0], 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    vocab, hidden = model.get_output_embeddings().weight.shape

    out = model(**sequence_inputs(prompts, ids, mask), use_cache=False)  # the full-logits way
    full = torch.log_softmax(out.logits[:, -8:-1, :].float() / 0.9, dim=-1)
    want = full.gather(-1, ids.unsqueeze(-1)).squeeze(-1)

    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 5 * vocab)
    watch = LargestVocabTensor(vocab, hidden)
    with watch:
        got, entropy = forward_logprobs(model, prompts, ids, mask, temperature=0.9, with_entropy=True)
        (got * mask).sum().backward()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy, -(full.exp() * full).sum(-1), atol=1e-5, rtol=0)
    assert 0 < watch.largest <= 5 * vocab, f"an fp32 [.., V] tensor of {watch.largest} elements (> 5 x {vocab})"


def test_rollout_keeps_one_decoding_step_of_logits(image_samples, monkeypatch):
    """While generate runs, the engine holds the newest step's [N, 1, V] logits, not every step's."""
    import weakref

    from lightrft_mm.models.tiny import build_tiny
    from lightrft_mm.processors import make_adapter
    from lightrft_mm.rollout.hf import HFRolloutEngine, SamplingParams

    model, processor = build_tiny("qwen2_5_vl", seed=0)
    adapter = make_adapter(model, processor)
    vocab = model.get_output_embeddings().weight.shape[0]
    refs = []

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == vocab and t.shape[0] > 1:
                    refs.append(weakref.ref(t))
            return out

    alive = []
    generate = model.generate

    def counting(*args, **kwargs):
        out = generate(*args, **kwargs)
        alive.append(sum(r() is not None for r in refs))  # what generate's result still holds
        return out

    monkeypatch.setattr(model, "generate", counting)
    torch.manual_seed(0)
    with Track():
        r = HFRolloutEngine(model, adapter, share_prefill=False).generate(
            adapter.encode_prompts(image_samples), 4, SamplingParams(max_new_tokens=16, temperature=1.5))
    assert r.completion_ids.shape[1] == 16 and len(refs) >= 16
    assert alive[0] <= 4, f"{alive[0]} vocabulary-wide tensors alive after generate (one step's are <= 4)"
