"""Generative reward model: a VLM judge, registered as the factory `generative_rm`.

For each completion the judge gets a user turn holding the Sample's media (images, video,
audio) and a prompt rendered from `template` (fields `{question}`, `{completion}`, `{answer}`,
`{choices}`, `{source}`; write literal braces as `{{` `}}`). It generates greedily through the
rollout-engine interface (`HFRolloutEngine.generate`), and a verdict parser turns its text into
a float, or None when the text holds no verdict.

Verdict parsers: `yes_no` (the last "yes"/"no" -> 1.0/0.0), `number` (the last number; "7/10"
-> 0.7), or your own `(text: str) -> float | None` named as `package.module:function` or
`path/file.py:function`.
"""

from __future__ import annotations

import dataclasses
import re
import string
from typing import Any, Callable

from lightrft_mm.errors import RewardError
from lightrft_mm.registry import Registry
from lightrft_mm.rewards.core import RewardInput, RewardOptions, reward_options
from lightrft_mm.schema import Message, Part, Sample

VERDICT_PARSERS = Registry("verdict parser")
FIELDS = ("question", "completion", "answer", "choices", "source")
DEFAULT_TEMPLATE = ("Question: {question}\nReference answer: {answer}\nResponse: {completion}\n"
                    "Is the response correct? Answer yes or no.")


@VERDICT_PARSERS.register("yes_no")
def yes_no(text: str) -> float | None:
    """1.0 / 0.0 for the last standalone "yes" / "no" (any case), None without one."""
    found = re.findall(r"\b(yes|no)\b", text, flags=re.IGNORECASE)
    return None if not found else float(found[-1].lower() == "yes")


@VERDICT_PARSERS.register("number")
def number(text: str) -> float | None:
    """The last number of the text; "a/b" gives a / b (a score out of b). None without one."""
    found = re.findall(r"(-?\d+(?:\.\d+)?)(?:\s*/\s*(\d+(?:\.\d+)?))?", text)
    if not found:
        return None
    value, scale = found[-1]
    return float(value) / float(scale) if scale and float(scale) else float(value)


def check_template(template: str) -> None:
    """Raises RewardError naming the problem when `template` cannot be rendered."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise RewardError(f"generative_rm: args.template is not a valid template ({exc}). Fix: write literal "
                          "braces as {{ and }}.") from exc
    unknown = sorted(n for n in names if n not in FIELDS)
    if unknown:
        raise RewardError(f"generative_rm: args.template uses unknown field(s) {', '.join(unknown)}; the fields are "
                          f"{', '.join('{' + f + '}' for f in FIELDS)}. Literal braces are written {{{{ and }}}}.")
    if "completion" not in names:
        raise RewardError("generative_rm: args.template never shows the judge the completion. Fix: add {completion}.")


@reward_options(factory=True)
def generative_rm(model: str, template: str = DEFAULT_TEMPLATE, parser: Any = "yes_no", system_prompt: str = "",
                  max_new_tokens: int = 64, with_media: bool = True, device: str = "auto", dtype: str = "float32",
                  micro_batch_size: int = 8, offload: bool = False, trust_remote_code: bool = False,
                  seed: int = 0) -> "JudgeRewardModel":
    """Builds a VLM judge (see the module docstring); config: `name: generative_rm, args: {...}`.

    Args:
        model: a local VLM folder (e.g. Qwen2.5-VL-7B-Instruct), or `tiny:<family>` (offline tests).
        template: the judge's prompt; fields {question} (the Sample's user text), {completion},
            {answer}, {choices} (comma-separated), {source}.
        parser: verdict parser: yes_no, number, or a `module:fn` / `file.py:fn` (or a callable).
        system_prompt: the judge's system message (empty = none).
        max_new_tokens: longest verdict, in tokens.
        with_media: show the judge the Sample's media (images, video, audio) before the prompt.
        device, dtype, micro_batch_size, offload, trust_remote_code, seed: as for scalar_rm.
    """
    import torch

    from lightrft_mm.processors import make_adapter
    from lightrft_mm.rewards.models import DTYPES, load_backbone, resolve_device

    check_template(template)
    if dtype not in DTYPES:
        raise RewardError(f"generative_rm: dtype {dtype!r} is not one of {', '.join(DTYPES)}.")
    parse = parser if callable(parser) else VERDICT_PARSERS.get(parser)
    if not isinstance(micro_batch_size, int) or micro_batch_size < 1 or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 1:
        raise RewardError(f"generative_rm: micro_batch_size and max_new_tokens must be whole numbers >= 1, got "
                          f"{micro_batch_size!r} and {max_new_tokens!r}.")
    backbone, processor, _ = load_backbone(model, "generative_rm", trust_remote_code=trust_remote_code, seed=seed)
    backbone = backbone.to(getattr(torch, dtype)).eval()
    adapter = make_adapter(backbone, processor)
    return JudgeRewardModel(backbone, adapter, parse, template=template, system_prompt=system_prompt,
                            max_new_tokens=max_new_tokens, with_media=with_media, device=resolve_device(device),
                            micro_batch_size=micro_batch_size, offload=offload)


class JudgeRewardModel:
    """A batched reward: the judge's verdict on each completion, parsed to a float (or None).

    Attributes:
        last_verdicts: the judge's texts of the last call (for debugging a template or parser).
    """

    __lightrft_reward__ = RewardOptions(batched=True)

    def __init__(self, model, adapter, parse: Callable[[str], Any], *, template: str = DEFAULT_TEMPLATE,
                 system_prompt: str = "", max_new_tokens: int = 64, with_media: bool = True, device: str = "cpu",
                 micro_batch_size: int = 8, offload: bool = False):
        from lightrft_mm.rollout.hf import HFRolloutEngine

        check_template(template)
        self.model = model
        self.adapter = adapter
        self.parse = parse
        self.template = template
        self.system_prompt = system_prompt
        self.max_new_tokens = max_new_tokens
        self.with_media = with_media
        self.device = device
        self.micro_batch_size = micro_batch_size
        self.offload = offload
        self.engine = HFRolloutEngine(model, adapter)
        self.last_verdicts: list[str] = []
        model.to("cpu" if offload else device)

    def render(self, x: RewardInput) -> Sample:
        """The judge's prompt for one completion: media first, then the rendered template."""
        s = x.sample
        text = self.template.format(question=s.prompt_text(), completion=x.completion,
                                    answer="" if s.answer is None else str(s.answer),
                                    choices=", ".join(str(c) for c in s.choices or []), source=s.source)
        media = [dataclasses.replace(p) for p in s.media()] if self.with_media else []
        messages = [Message("system", [Part("text", text=self.system_prompt)])] if self.system_prompt else []
        messages.append(Message("user", media + [Part("text", text=text)]))
        return Sample(id=f"{s.id}/judge", messages=messages, source=s.source)

    def __call__(self, inputs: list[RewardInput]) -> list:
        import torch

        from lightrft_mm.rewards.models import placed
        from lightrft_mm.rollout.hf import SamplingParams

        sampling = SamplingParams(max_new_tokens=self.max_new_tokens, greedy=True)
        verdicts: list[str] = []
        with placed([self.model], self.device, self.offload), torch.no_grad():
            for start in range(0, len(inputs), self.micro_batch_size):
                chunk = inputs[start:start + self.micro_batch_size]
                prompts = self.adapter.encode_prompts([self.render(x) for x in chunk])
                verdicts += self.engine.generate(prompts, 1, sampling).texts
        self.last_verdicts = verdicts
        return [self._parse(text) for text in verdicts]

    def _parse(self, text: str) -> Any:
        try:
            return self.parse(text)
        except Exception as exc:  # noqa: BLE001 - counted as this sample's failure
            return RewardError(f"verdict parser failed on {text[:80]!r}: {type(exc).__name__}: {exc}")
