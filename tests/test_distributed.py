"""Data-parallel strategies under torchrun, 2 CPU processes over gloo (marker `distributed`).

Parity: three GRPO updates on one fixed global batch of completions (tests/workers/parity.py)
give the same losses and gradient norms on 2 ranks as in one process. Tolerance: the ranks'
gradients are averaged by a reduce-scatter / all-reduce instead of summed in one backward, so
they differ by fp32 rounding (about 1e-7 relative, measured 3e-7 to 5e-7 for fsdp2 and ZeRO-2/3); three Adam
steps carry that into the parameters at lr * 1e-7. rtol 1e-5 on the loss and 1e-5 on the
gradient norm is 20x the measured difference and far below what a wrong normaliser (a factor
of 2), a lost rank (half the batch) or a skipped micro-batch would give.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightrft_mm.prepare import prepare_synthetic

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).parent / "workers" / "parity.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], *, nproc: int = 2, timeout: float = 600, env: dict | None = None):
    """Run `torchrun --nproc_per_node nproc ARGS` (a script path or `-m module ...`)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.fixture(scope="module")
def colors(tmp_path_factory) -> Path:
    return prepare_synthetic("colors", tmp_path_factory.mktemp("colors") / "train", n=16, seed=1)


@pytest.fixture(scope="module")
def tones(tmp_path_factory) -> Path:
    return prepare_synthetic("higher_tone", tmp_path_factory.mktemp("tones") / "train", n=8, seed=1)


STRATEGY_KEYS = ("strategy.name=", "strategy.zero_stage=")


class ParityRuns:
    """The parity cases the session selected, run in as few processes as possible: every
    one-process case in one process, every 2-rank case of a strategy in one torchrun launch
    (starting a process, importing torch, transformers and DeepSpeed, takes longer than a case).
    A case is (data, overrides, nproc); `get` runs its whole batch the first time one is asked.
    A batch runs once: when a case fails, it and the cases after it report that failure."""

    def __init__(self, tmp: Path, data: dict[str, Path], cases: list[tuple]):
        self.tmp, self.data, self.results, self.errors = tmp, data, {}, {}
        self.batches: dict[tuple, list[tuple]] = {}
        for case in dict.fromkeys(cases):
            self.batches.setdefault(self.batch_of(case), []).append(case)

    @staticmethod
    def batch_of(case: tuple) -> tuple:
        _, overrides, nproc = case
        return (1,) if nproc == 1 else (nproc, *sorted(o for o in overrides if o.startswith(STRATEGY_KEYS)))

    def get(self, case: tuple) -> dict:
        batch = self.batch_of(case)
        if case not in self.results and case not in self.errors:
            self.run(list(self.batches).index(batch), self.batches[batch])
        assert case in self.results, self.errors[case]
        return self.results[case]

    def run(self, index: int, cases: list[tuple]) -> None:
        spec = self.tmp / f"batch-{index}.json"
        outs = [self.tmp / f"batch-{index}-{i}.json" for i in range(len(cases))]
        spec.write_text(json.dumps([{"out": str(out), "data": str(self.data[data]), "overrides": list(overrides)}
                                    for out, (data, overrides, _) in zip(outs, cases)]))
        nproc = cases[0][2]
        if nproc == 1:
            proc = subprocess.run([sys.executable, str(WORKER), str(spec)], capture_output=True, text=True,
                                  timeout=600 + 60 * len(cases))
        else:
            proc = torchrun([str(WORKER), str(spec)], nproc=nproc, timeout=600 + 60 * len(cases))
        # Cases run in order: the written prefix passed; a crash after the last case fails the last.
        done = next((i for i, out in enumerate(outs) if not out.is_file()), len(cases))
        if proc.returncode != 0:
            done = min(done, len(cases) - 1)
        for case, out in zip(cases[:done], outs):
            self.results[case] = json.loads(out.read_text())
        for case in cases[done:]:
            self.errors[case] = f"case {done + 1} of {len(cases)} failed: {cases[done]}\n{proc.stderr[-4000:]}"


def parity_cases(item) -> list[tuple]:
    """The parity runs a collected test needs (see ParityRuns)."""
    params = getattr(item, "callspec", None) and item.callspec.params
    if item.originalname == "test_two_ranks_match_one_process":
        overrides = STRATEGY_CASES[params["case"]]
        data = "tones" if "qwen2_audio" in params["case"] else "colors"
        return [(data, tuple(o for o in overrides if o.startswith(("algorithm.", "model."))), 1),
                (data, tuple(overrides), 2)]
    if item.originalname == "test_bf16_changes_every_parameter_at_lr_1e_6":
        return [("colors", FP32_AT_LR_1E_6, 1), ("colors", bf16_case(params["strategy"]), params["nproc"])]
    return []


@pytest.fixture(scope="module")
def parity(request, tmp_path_factory, colors, tones) -> ParityRuns:
    here = [item for item in request.session.items if item.module is request.module]
    return ParityRuns(tmp_path_factory.mktemp("parity"), {"colors": colors, "tones": tones},
                      [case for item in here for case in parity_cases(item)])


STRATEGY_CASES = {
    "fsdp2": ["strategy.name=fsdp2"],
    "fsdp2-reinforce_pp": ["strategy.name=fsdp2", "algorithm.name=reinforce_pp"],  # global whitening
    "fsdp2-dr_grpo": ["strategy.name=fsdp2", "algorithm.name=dr_grpo", "algorithm.mini_batches=2"],
    "fsdp2-high_entropy": ["strategy.name=fsdp2", "algorithm.high_entropy_ratio=0.3"],  # global threshold
    "zero2": ["strategy.name=deepspeed", "strategy.zero_stage=2"],
    "zero3": ["strategy.name=deepspeed", "strategy.zero_stage=3"],
    "zero3-rloo": ["strategy.name=deepspeed", "strategy.zero_stage=3", "algorithm.name=rloo"],
    # Every family: LLaVA selects a hidden layer (output capture), LLaVA-NeXT owns image_newline
    # outside its towers, Qwen2-Audio's encoder reads embed_positions.weight without calling it.
    "fsdp2-llava": ["strategy.name=fsdp2", "model.name_or_path=tiny:llava"],
    "zero3-llava": ["strategy.name=deepspeed", "strategy.zero_stage=3", "model.name_or_path=tiny:llava"],
    "fsdp2-llava_next": ["strategy.name=fsdp2", "model.name_or_path=tiny:llava_next"],
    "fsdp2-qwen2_audio": ["strategy.name=fsdp2", "model.name_or_path=tiny:qwen2_audio"],
    "zero3-qwen2_audio": ["strategy.name=deepspeed", "strategy.zero_stage=3", "model.name_or_path=tiny:qwen2_audio"],
    "zero2-qwen2_vl": ["strategy.name=deepspeed", "strategy.zero_stage=2", "model.name_or_path=tiny:qwen2_vl"],
    # The families of issue 16: DeepStack mergers, Gated DeltaNet, the thinker's towers, tiles, SigLIP.
    **{f"fsdp2-{f}": ["strategy.name=fsdp2", f"model.name_or_path=tiny:{f}"]
       for f in ("qwen3_vl", "qwen3_5", "qwen2_5_omni", "internvl", "gemma3")},
    "zero3-qwen3_vl": ["strategy.name=deepspeed", "strategy.zero_stage=3", "model.name_or_path=tiny:qwen3_vl"],
    "zero3-gemma3": ["strategy.name=deepspeed", "strategy.zero_stage=3", "model.name_or_path=tiny:gemma3"],  # tied head
    # LoRA: adapters and their frozen base layers inside the same sharded units.
    "fsdp2-lora": ["strategy.name=fsdp2", "model.lora.r=4", "model.lora.parts=[llm, vision]"],
    "zero2-lora": ["strategy.name=deepspeed", "strategy.zero_stage=2", "model.lora.r=4"],
    "fsdp2-padding_free": ["strategy.name=fsdp2", "trainer.padding_free=true"],  # vs the padded single run
    "zero3-padding_free": ["strategy.name=deepspeed", "strategy.zero_stage=3", "trainer.padding_free=true"],
}


@pytest.mark.parametrize("case", list(STRATEGY_CASES))
def test_two_ranks_match_one_process(case, request, parity):
    single, sharded = map(parity.get, parity_cases(request.node))
    assert sharded["loss"] == pytest.approx(single["loss"], rel=1e-5, abs=1e-7)
    assert sharded["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-5)
    assert sharded["changed"] == single["changed"]  # every parameter a step moves in one process moves here
    assert sharded["engine_weights_equal"] and single["engine_weights_equal"]  # what a vLLM engine is sent


def test_zero3_refuses_a_model_whose_own_parameters_it_cannot_gather():
    """validate refuses tiny:llava_next with ZeRO-3 (test_strategies); the strategy itself refuses
    any model whose base owns parameters, whatever its name (here in a world of one)."""
    code = ("import functools, torch; from lightrft_mm.config import StrategyConfig; "
            "from lightrft_mm.models.tiny import build_tiny; "
            "from lightrft_mm.strategy.deepspeed import DeepSpeedStrategy; "
            "s = DeepSpeedStrategy(StrategyConfig(name='deepspeed', zero_stage=3)); "
            "s.prepare(build_tiny('llava_next')[0], functools.partial(torch.optim.AdamW, lr=1e-3))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "cannot shard LlavaNextForConditionalGeneration's own parameters (image_newline)" in proc.stderr
    assert "strategy.name=fsdp2" in proc.stderr


FP32_AT_LR_1E_6 = ("trainer.lr=1e-6",)


def bf16_case(strategy: str) -> tuple:
    return f"strategy.name={strategy}", "strategy.precision=bf16", "trainer.lr=1e-6"


@pytest.mark.parametrize("strategy,nproc", [("single", 1), ("fsdp2", 2), ("deepspeed", 2)])
def test_bf16_changes_every_parameter_at_lr_1e_6(strategy, nproc, request, parity):
    """fp32 master weights: a bf16 run's update of lr 1e-6 is not rounded away. Every trainable
    tensor changes, and as many of their elements as in fp32 (the embedding rows of tokens the
    batch does not hold get no gradient in either)."""
    fp32, result = map(parity.get, parity_cases(request.node))
    unchanged = [k for k, v in result["changed"].items() if not v]
    assert not unchanged, f"parameters a bf16 step left unchanged: {unchanged}"
    assert result["changed_fraction"] >= 0.99 * fp32["changed_fraction"]


def test_single_strategy_under_torchrun_is_refused(tmp_path):
    proc = torchrun(["-m", "lightrft_mm", "validate", "recipes/demo/colors.yaml"], timeout=120)
    assert proc.returncode != 0
    assert "strategy.name: 'single' under torchrun with 2 processes" in proc.stderr
    assert "strategy.name=fsdp2" in proc.stderr


def test_a_dead_rank_stops_the_others(tmp_path, colors):
    """Rank 1 dies at its first reward call; rank 0 must not wait forever in a collective."""
    plugin = tmp_path / "dies.py"
    plugin.write_text("import os\n\ndef dies(inputs):\n    if os.environ['RANK'] == '1':\n        os._exit(3)\n"
                      "    return [0.0 for _ in inputs]\n")
    started = time.time()
    proc = torchrun(["-m", "lightrft_mm", "train", "recipes/demo/colors.yaml", "strategy.name=fsdp2",
                     "strategy.timeout_s=30", f"data.train=[{colors}]", "data.eval=[]", "warmup.steps=0",
                     f"rewards=[{{name: '{plugin}:dies'}}]", f"trainer.output_dir={tmp_path / 'run'}",
                     "logging.progress=false", "data.batch_size=4", "rollout.n=2"], timeout=300)
    assert proc.returncode != 0
    assert time.time() - started < 200
    assert "rank" in proc.stderr and "exitcode  : 3" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [["strategy.name=fsdp2"], ["strategy.name=deepspeed", "strategy.zero_stage=3"]],
                         ids=["fsdp2", "zero3"])
def test_colour_demo_learns_on_two_ranks(strategy, tmp_path, checkpoint_accuracy):
    """The issue's check: `torchrun --nproc_per_node 2 -m lightrft_mm train recipes/demo/colors.yaml
    strategy.name=...` writes one run folder (rank 0), learns (>= 0.8 held-out), and its final
    checkpoint reloads in transformers without this package."""
    data, out = tmp_path / "data", tmp_path / "run"
    proc = torchrun(["-m", "lightrft_mm", "train", "recipes/demo/colors.yaml", *strategy,
                     f"data.train=[{data / 'train'}]", f"data.eval=[{data / 'heldout'}]",
                     f"trainer.output_dir={out}", "logging.progress=false"], timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("train: accuracy") == 1  # rank 0 reports, once
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["before"] <= 0.35 and summary["after"] >= 0.8, summary
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").open() if "grad_norm" in line]
    assert steps == list(range(1, 151))  # one writer: every step once
    reload = subprocess.run([sys.executable, "-c", (
        "import sys, transformers; m = transformers.AutoModelForImageTextToText.from_pretrained(sys.argv[1]); "
        "assert 'lightrft_mm' not in sys.modules; print(type(m).__name__)"), summary["checkpoint"]],
        capture_output=True, text=True, check=True)
    assert "Qwen2_5_VL" in reload.stdout
    assert checkpoint_accuracy(summary["checkpoint"], [data / "heldout"], max_new_tokens=8)[0] == pytest.approx(
        summary["after"])


@pytest.mark.parametrize("strategy", [["strategy.name=fsdp2"], ["strategy.name=deepspeed", "strategy.zero_stage=3"]],
                         ids=["fsdp2", "zero3"])
def test_dapo_with_kl_tis_and_accumulation_runs_on_two_ranks(strategy, tmp_path, colors):
    """Dynamic sampling (ranks keep different numbers of informative groups and must train on
    as many), the KL reference (sharded by the strategy), TIS and micro-batch accumulation."""
    out = tmp_path / "run"
    proc = torchrun(["-m", "lightrft_mm", "train", "recipes/demo/colors.yaml", *strategy, "algorithm.name=dapo",
                     "algorithm.kl_coef=0.01", "algorithm.tis_cap=2", "algorithm.mini_batches=2",
                     "trainer.micro_batch_groups=1", "warmup.steps=20", "trainer.max_steps=4", "data.batch_size=8",
                     f"data.train=[{colors}]", f"data.eval=[{colors}]", f"trainer.output_dir={out}",
                     "logging.progress=false", "logging.plot=false"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").open() if "grad_norm" in line]
    assert len(rows) == 4
    assert all(0 <= r["sampling/kept_fraction"] <= 1 and r["loss/kl"] >= 0 and r["kl/coef"] == 0.01 for r in rows)
    assert any(r["grad_norm"] > 0 for r in rows)


@pytest.mark.parametrize("strategy", [["strategy.name=fsdp2"], ["strategy.name=deepspeed", "strategy.zero_stage=2"]],
                         ids=["fsdp2", "zero2"])
def test_lora_with_the_base_model_as_kl_reference_on_two_ranks(strategy, tmp_path, colors):
    """LoRA, sharded, its KL reference the policy with adapters off: KL 0 at step 1 (B = 0),
    then > 0; the checkpoint's adapter and merged weights are written from the gathered state."""
    out = tmp_path / "run"
    reward = tmp_path / "length.py"
    reward.write_text("def length(inputs):\n    return [float(len(x.completion_ids)) for x in inputs]\n")
    proc = torchrun(["-m", "lightrft_mm", "train", "recipes/demo/colors.yaml", *strategy, "model.lora.r=4",
                     "algorithm.kl_coef=0.1", "algorithm.kl_in=loss", "warmup.steps=0", "trainer.max_steps=3",
                     "data.batch_size=4", "rollout.n=4", "trainer.lr=3e-2", f"data.train=[{colors}]", "data.eval=[]",
                     f"rewards=[{{name: '{reward}:length'}}]", f"trainer.output_dir={out}",
                     "logging.progress=false", "logging.plot=false"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    kl = [json.loads(line)["loss/kl"] for line in (out / "metrics.jsonl").open() if "grad_norm" in line]
    assert kl[0] == 0.0 and kl[-1] > 0
    assert (out / "checkpoint-final" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("strategy", [["strategy.name=fsdp2"], ["strategy.name=deepspeed", "strategy.zero_stage=3"]],
                         ids=["fsdp2", "zero3"])
def test_frozen_vision_and_checkpointing_on_two_ranks(strategy, tmp_path, colors):
    """model.freeze=[vision] with activation checkpointing, sharded: the tower in the gathered
    checkpoint is bit-identical to the initial one, the rest trained."""
    import torch

    from lightrft_mm.models import load_pretrained
    from lightrft_mm.models.tiny import build_tiny
    from lightrft_mm.models.trainable import part_of_each_parameter

    out = tmp_path / "run"
    reward = tmp_path / "length.py"
    reward.write_text("def length(inputs):\n    return [float(len(x.completion_ids)) for x in inputs]\n")
    proc = torchrun(["-m", "lightrft_mm", "train", "recipes/demo/colors.yaml", *strategy, "model.freeze=[vision]",
                     "model.gradient_checkpointing=true", "warmup.steps=0", "trainer.max_steps=2", "data.batch_size=4",
                     "rollout.n=4", "trainer.lr=1e-2", f"data.train=[{colors}]", "data.eval=[]",
                     f"rewards=[{{name: '{reward}:length'}}]", f"trainer.output_dir={out}",
                     "logging.progress=false", "logging.plot=false"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    before, _ = build_tiny("qwen2_5_vl", seed=0)
    names = {id(p): n for n, p in before.named_parameters()}
    after = dict(load_pretrained(out / "checkpoint-final")[0].named_parameters())
    for part, params in part_of_each_parameter(before).items():
        same = [torch.equal(p.detach(), after[names[id(p)]].detach()) for p in params]
        assert all(same) if part == "vision" else not all(same), part
