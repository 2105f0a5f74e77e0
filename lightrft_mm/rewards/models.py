"""Scalar reward models, registered as the factory `scalar_rm`.

Two kinds, picked from the model folder:

- a Hugging Face *sequence-classification* model (`architectures: [...ForSequenceClassification]`):
  text only; it reads the prompt's text and the completion through its chat template and its
  logit `label_index` is the reward;
- a VLM / audio-LM *backbone with a value head*: the prompt is encoded by the backbone's model
  adapter with the Sample's media (images, video, audio), the completion and end-of-turn token
  follow, and a linear head on the last token's final hidden state gives the reward. The head
  lives next to the weights as `value_head.safetensors` (`weight` [1, H], `bias` [1]; see
  `save_value_head`). `tiny:<family>` builds a random backbone and head offline (for tests).

Colocation: with `offload: true` the model sits on the CPU and moves to its device only while it
scores a batch; inputs are scored `micro_batch_size` at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any

from lightrft_mm.errors import ModelError, RewardError
from lightrft_mm.rewards.core import RewardInput, RewardOptions, reward_options

VALUE_HEAD_FILE = "value_head.safetensors"
DTYPES = ("float32", "bfloat16", "float16")


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when available, else "cpu"; anything else as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def placed(modules: list, device: str, offload: bool):
    """Runs the block with `modules` on `device`; with `offload` they move there first and back
    to the CPU after (an offloaded model is built on the CPU)."""
    import torch

    if offload:
        for module in modules:
            module.to(device)
    try:
        yield
    finally:
        if offload:
            for module in modules:
                module.to("cpu")
            if str(device).startswith("cuda"):
                torch.cuda.empty_cache()


def save_value_head(head: Any, folder: str | Path) -> Path:
    """Writes a `torch.nn.Linear(H, 1)` value head as `folder/value_head.safetensors`."""
    from safetensors.torch import save_file

    path = Path(folder) / VALUE_HEAD_FILE
    save_file({"weight": head.weight.detach().cpu().contiguous(), "bias": head.bias.detach().cpu().contiguous()},
              str(path))
    return path


def load_backbone(model: str, who: str, *, trust_remote_code: bool = False, seed: int = 0):
    """`(model, processor, folder or None)` for a local model folder or `tiny:<family>`."""
    if model.startswith("tiny:"):
        from lightrft_mm.models.tiny import build_tiny

        backbone, processor = build_tiny(model[len("tiny:"):], seed=seed)
        return backbone, processor, None
    from lightrft_mm.models.hub import resolve

    folder = resolve(model)  # a Hub id: its cached snapshot (downloaded unless offline)
    if not (folder / "config.json").is_file():
        raise ModelError(f"{who}: model folder {folder} has no config.json. Fix: args.model is a local "
                         "model folder, a Hub id (ORG/NAME), or tiny:<family>.")
    from lightrft_mm.models import load_pretrained

    backbone, processor = load_pretrained(folder, trust_remote_code=trust_remote_code)
    return backbone, processor, folder


def _value_head(hidden: int, folder: Path | None, seed: int):
    import torch

    head = torch.nn.Linear(hidden, 1)
    if folder is None:  # tiny: a seeded random head
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            head.weight.normal_(0.0, 1.0 / hidden ** 0.5, generator=generator)
            head.bias.zero_()
        return head
    path = folder / VALUE_HEAD_FILE
    if not path.is_file():
        raise ModelError(f"scalar_rm: {folder} is neither a sequence-classification model (config.json "
                         f"architectures) nor a backbone with a value head ({path} is missing). Fix: point "
                         "args.model at a reward model folder, or save a head with "
                         "lightrft_mm.rewards.models.save_value_head.")
    from safetensors.torch import load_file

    state = load_file(str(path))
    if set(state) != {"weight", "bias"} or tuple(state["weight"].shape) != (1, hidden):
        raise ModelError(f"scalar_rm: {path} must hold weight [1, {hidden}] and bias [1]; it holds "
                         f"{ {k: tuple(v.shape) for k, v in state.items()} }.")
    head.load_state_dict(state)
    return head


@reward_options(factory=True)
def scalar_rm(model: str, device: str = "auto", dtype: str = "float32", micro_batch_size: int = 8,
              offload: bool = False, label_index: int = 0, system_prompt: str = "",
              trust_remote_code: bool = False, seed: int = 0) -> "ScalarRewardModel":
    """Builds a scalar reward model (see the module docstring); config: `name: scalar_rm, args: {...}`.

    Args:
        model: a reward model folder, or `tiny:<family>` (random backbone and head, offline).
        device: "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
        dtype: float32, bfloat16 or float16.
        micro_batch_size: completions per forward pass.
        offload: keep the model on the CPU between scoring calls (colocated with the policy).
        label_index: the logit that is the reward (sequence-classification models).
        system_prompt: system message for prompts without one (backbone models).
        trust_remote_code: allow model code from the folder.
        seed: seed of a tiny: model and its head.
    """
    import torch

    if dtype not in DTYPES:
        raise RewardError(f"scalar_rm: dtype {dtype!r} is not one of {', '.join(DTYPES)}.")
    if not isinstance(micro_batch_size, int) or micro_batch_size < 1:
        raise RewardError(f"scalar_rm: micro_batch_size must be a whole number >= 1, got {micro_batch_size!r}.")
    architectures = []
    if not model.startswith("tiny:"):
        from lightrft_mm.models.hub import resolve

        config_file = resolve(model) / "config.json"  # a Hub id: its cached snapshot, downloaded unless offline
        if config_file.is_file():
            architectures = json.loads(config_file.read_text()).get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        folder = config_file.parent
        backbone = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=trust_remote_code)
        processor = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        kind = "classifier"
    else:
        backbone, processor, folder = load_backbone(model, "scalar_rm", trust_remote_code=trust_remote_code, seed=seed)
        kind = "value_head"
    head = None
    if kind == "value_head":
        head = _value_head(backbone.config.get_text_config().hidden_size, folder, seed)
    elif not 0 <= label_index < backbone.config.num_labels:
        raise RewardError(f"scalar_rm: label_index {label_index} is out of range; {model} has "
                          f"{backbone.config.num_labels} label(s).")
    torch_dtype = getattr(torch, dtype)
    return ScalarRewardModel(backbone.to(torch_dtype).eval(), processor, head.to(torch_dtype) if head else None,
                             device=resolve_device(device), micro_batch_size=micro_batch_size, offload=offload,
                             label_index=label_index, system_prompt=system_prompt or None)


class ScalarRewardModel:
    """A batched reward: one float per completion from a classifier or a value-head backbone."""

    __lightrft_reward__ = RewardOptions(batched=True)

    def __init__(self, model, processor, head=None, *, device: str = "cpu", micro_batch_size: int = 8,
                 offload: bool = False, label_index: int = 0, system_prompt: str | None = None):
        self.model = model
        self.head = head
        self.processor = processor
        self.device = device
        self.micro_batch_size = micro_batch_size
        self.offload = offload
        self.label_index = label_index
        if head is not None:
            from lightrft_mm.processors import make_adapter

            self.adapter = make_adapter(model, processor, system_prompt=system_prompt)
        else:
            self.tokenizer = processor
            if processor.pad_token_id is None:
                processor.pad_token = processor.eos_token
            if model.config.pad_token_id is None:
                model.config.pad_token_id = processor.pad_token_id
        self.modules = [model] + ([head] if head is not None else [])
        for module in self.modules:
            module.to("cpu" if offload else device)

    def __call__(self, inputs: list[RewardInput]) -> list[float]:
        import torch

        scores: list[float] = []
        with placed(self.modules, self.device, self.offload), torch.no_grad():
            for start in range(0, len(inputs), self.micro_batch_size):
                chunk = inputs[start:start + self.micro_batch_size]
                scores += self._value_head(chunk) if self.head is not None else self._classify(chunk)
        return scores

    def _classify(self, chunk: list[RewardInput]) -> list[float]:
        texts = [self._text(x) for x in chunk]
        templated = bool(getattr(self.tokenizer, "chat_template", None))
        batch = self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=not templated)
        logits = self.model(**batch.to(self.device)).logits
        return logits[:, self.label_index].float().tolist()

    def _text(self, x: RewardInput) -> str:
        turns = [{"role": m.role, "content": "\n".join(p.text for p in m.content if p.type == "text" and p.text)}
                 for m in x.messages]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(turns + [{"role": "assistant", "content": x.completion}],
                                                      tokenize=False)
        return "\n".join(t["content"] for t in turns) + "\n" + x.completion

    def _value_head(self, chunk: list[RewardInput]) -> list[float]:
        import torch

        from lightrft_mm.models.logprobs import sequence_inputs
        from lightrft_mm.processors.adapter import collate

        adapter = self.adapter
        encodings = [adapter.encode_one(dataclasses.replace(x.sample, messages=list(x.messages))) for x in chunk]
        prompts = collate(encodings, adapter.pad_token_id).to(self.device)
        completions = [adapter.tokenizer(x.completion, add_special_tokens=False)["input_ids"] + [adapter.eos_token_id]
                       for x in chunk]
        width = max(len(c) for c in completions)
        ids = torch.full((len(chunk), width), adapter.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, c in enumerate(completions):
            ids[row, :len(c)] = torch.tensor(c)
            mask[row, :len(c)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        out = self.model(**sequence_inputs(prompts, ids, mask), output_hidden_states=True, use_cache=False,
                         logits_to_keep=1)
        hidden = out.hidden_states[-1]
        last = prompts.input_ids.shape[1] + mask.sum(1) - 1
        return self.head(hidden[torch.arange(len(chunk), device=hidden.device), last]).squeeze(-1).float().tolist()
