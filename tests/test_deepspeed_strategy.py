"""The deepspeed strategy on 2 CPU processes (torchrun, gloo) against plain single-process torch.

One torchrun launch runs this file as its worker (`__main__` below) through every case and
rank 0 writes the measurements to a JSON file; the tests assert on them.

The reference is the same tiny model trained in one process on the whole batch (torch AdamW,
the same clipping). The distributed run splits the batch over 2 ranks and each rank's share
into a varying number of weighted micro-batches (2, then 3, then 1 per step).

Tolerances: gradient norms rtol 1e-5 (measured 2.5e-7: fp32 reduction order). Parameters atol
1e-5 after 3 steps that move them by up to 3e-3 (lr 1e-3): measured 1.5e-6, all of it in the
key-projection biases, whose true gradient is zero (softmax is shift invariant), so Adam scales
their fp32 round-off up to the learning rate; one process accumulating the same micro-batches
shows the same 1.7e-6. Counting only each step's last micro-batch (what ZeRO-3 does when the
engine's forward is bypassed and `backward` does not make up for it) is off by 6e-3.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.distributed

LR, CLIP = 1e-3, 1.0
SPLITS = [[1, 3], [1, 1, 2], [4]]  # rows of each micro-batch, per rank, per step (4 rows a rank)
ROWS = 4
NORM_RTOL, PARAM_ATOL = 1e-5, 1e-5


# ---- the worker (runs under torchrun) ---------------------------------------------------------

def _batch():
    return torch.randint(0, 300, (2 * ROWS, 12), generator=torch.Generator().manual_seed(1))


def _row_losses(model, ids):
    """Mean next-token cross-entropy of each row, [B]."""
    import torch.nn.functional as F

    logits = model(input_ids=ids).logits[:, :-1].float()
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    return losses.view(ids.shape[0], -1).mean(1)


def _tiny(dtype=None):
    from lightrft_mm.models.tiny import build_tiny

    model, _ = build_tiny("qwen2", seed=0)
    return model.to(dtype or torch.float32).train()


def _reference():
    """Norms and final weights of plain single-process training on the whole batch."""
    model = _tiny()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    norms, ids = [], _batch()
    for _ in SPLITS:
        _row_losses(model, ids).mean().backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        optimizer.step()
        optimizer.zero_grad()
    return model, norms


def _strategy(stage, **kw):
    from lightrft_mm.config.sections import StrategyConfig
    from lightrft_mm.strategy.deepspeed import DeepSpeedStrategy

    return DeepSpeedStrategy(StrategyConfig(name="deepspeed", device="cpu", zero_stage=stage, **kw),
                             max_grad_norm=CLIP)


def _prepare(strategy, model, lr=LR):
    return strategy.prepare(model, lambda params: torch.optim.AdamW(params, lr=lr))[0]


def _train_steps(strategy, module, splits):
    """This rank's rows, as weighted micro-batches: their losses sum to the rank's mean."""
    ids = _batch()[ROWS * strategy.rank: ROWS * (strategy.rank + 1)] if strategy.world_size > 1 else _batch()
    rows = ids.shape[0]
    norms = []
    for split in splits:
        start = 0
        for n in split:
            strategy.backward(_row_losses(module, ids[start:start + n]).sum() / rows)
            start += n
        norms.append(strategy.step())
    return norms


def _max_diff(state, ref_state) -> float:
    return max((state[k].float() - ref_state[k].float()).abs().max().item() for k in ref_state)


def _state_facts(state, ref_model) -> dict:
    """On rank 0: keys, dtypes, devices of a full state dict and whether it reloads."""
    fresh = _tiny()
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    return {"keys_match": sorted(state) == sorted(ref_model.state_dict()), "missing": missing,
            "unexpected": unexpected, "devices": sorted({v.device.type for v in state.values()}),
            "dtypes": sorted({str(v.dtype) for v in state.values()})}


def _generate(strategy, module, ref_model) -> dict:
    """Greedy generate on both ranks with different prompts; rank 0 stops after one token (its
    EOS is set to its first greedy token), so rank 1's forwards continue alone, which ZeRO-3
    only survives with synced_gpus."""
    lengths = (5, 9)
    prompt = _batch()[0:1, : lengths[strategy.rank]] + strategy.rank
    with torch.no_grad():
        ref_first = ref_model.generate(prompt, max_new_tokens=1, do_sample=False)[0, -1].item()
        eos = ref_first if strategy.rank == 0 else ref_model.config.eos_token_id
        ref = ref_model.generate(prompt, max_new_tokens=4, do_sample=False, eos_token_id=eos, pad_token_id=0)
        module.eval()
        out = module.generate(prompt, max_new_tokens=4, do_sample=False, synced_gpus=True, eos_token_id=eos,
                              pad_token_id=0)
        module.train()
    return {"new_tokens": out.shape[1] - prompt.shape[1], "same_as_reference": out.tolist() == ref.tolist()}


def _parity_case(stage, ref_model, ref_norms, save_dir, **kw) -> dict:
    """3 steps; the state after step 2 is saved, then resumed by a fresh engine for step 3.

    Step 2 calls the HF model inside the engine directly, as code reaching into the model's
    towers does: its micro-batches must still add up."""
    strategy = _strategy(stage, **kw)
    module = _prepare(strategy, _tiny())
    norms = _train_steps(strategy, module, SPLITS[:1])
    norms += _train_steps(strategy, strategy.engine.module, SPLITS[1:2])
    state2 = strategy.full_state_dict()
    strategy.save(save_dir)
    norms += _train_steps(strategy, module, SPLITS[2:])
    state3 = strategy.full_state_dict()
    facts = {"norms": norms, "ref_norms": ref_norms, "other_rank_state": strategy.gather(len(state3))[1],
             "norms_per_rank": strategy.gather(norms),
             "offloaded": strategy.engine.zero_cpu_offload()}
    if strategy.sharded_params:
        facts["generate"] = strategy.gather(_generate(strategy, module, ref_model))
        frozen = strategy.prepare_frozen(_tiny())
        facts["frozen_sharded"] = all(p.numel() == 0 and p.ds_numel > 0 for p in frozen.parameters())
        with torch.no_grad():
            diff = (frozen(input_ids=_batch()).logits - _tiny().eval()(input_ids=_batch()).logits).abs().max()
        facts["frozen_logits_diff"] = diff.item()
    # Resume as the trainer does: a fresh model from the saved weights, then the engine state.
    resumed = _strategy(stage, **kw)
    model = _tiny()
    model.load_state_dict(_broadcast(state2))
    resumed_module = _prepare(resumed, model)
    resumed.load(save_dir)
    resumed_norm = _train_steps(resumed, resumed_module, SPLITS[2:])
    resumed_state = resumed.full_state_dict()
    if strategy.is_main:
        ref_state = ref_model.state_dict()
        facts.update(max_param_diff=_max_diff(state3, ref_state), **_state_facts(state3, ref_model),
                     resumed_norm=resumed_norm[0], resumed_diff=_max_diff(resumed_state, state3))
    return facts


def _broadcast(state):
    import torch.distributed as dist

    box = [state]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def worker(out_path: str, save_root: str) -> None:
    ref_model, ref_norms = _reference()
    results = {"ref_update": max((p - q).abs().max().item() for p, q in zip(ref_model.parameters(),
                                                                              _tiny().parameters()))}
    for stage in (1, 2, 3):
        results[f"zero{stage}"] = _parity_case(stage, ref_model, ref_norms, Path(save_root) / f"zero{stage}")
    results["offload"] = _parity_case(2, ref_model, ref_norms, Path(save_root) / "offload", offload="optimizer")
    results["offload_all"] = _parity_case(3, ref_model, ref_norms, Path(save_root) / "offload_all", offload="all")

    # bf16: bf16 forwards, fp32 masters; a 1e-6 update is below bf16's resolution at these weights.
    before = _tiny().state_dict()
    for stage in (1, 2, 3):  # stage 1 runs DeepSpeed's BF16_Optimizer, 2 and 3 their ZeRO optimizers
        strategy = _strategy(stage, precision="bf16")
        module = _prepare(strategy, _tiny(torch.bfloat16), lr=1e-6)
        norms = _train_steps(strategy, module, SPLITS[:2])
        after = strategy.full_state_dict()
        if strategy.is_main:
            changed = {k: (after[k] != before[k].to(torch.bfloat16).float()).float().mean().item() for k in after}
            results[f"bf16_zero{stage}"] = {
                "norms": norms, "module_dtype": str(next(module.module.parameters()).dtype),
                "state_dtypes": sorted({str(v.dtype) for v in after.values()}), "changed": changed}

    # A model that arrives in bf16 trains on fp32 masters under precision fp32.
    strategy = _strategy(1)
    module = _prepare(strategy, _tiny(torch.bfloat16))
    results["fp32_from_bf16"] = sorted({str(p.dtype) for p in module.module.parameters()})
    if strategy.is_main:
        Path(out_path).write_text(json.dumps(results))
    strategy.close()


def single_worker(out_path: str) -> None:
    """Without torchrun: a world of one, ZeRO-3, the whole batch in the same micro-batches."""
    ref_model, ref_norms = _reference()
    strategy = _strategy(3)
    module = _prepare(strategy, _tiny())
    norms = _train_steps(strategy, module, [[2 * n for n in split] for split in SPLITS])  # all 8 rows
    state = strategy.full_state_dict()
    prompt = _batch()[:1, :6]
    same = module.generate(prompt, max_new_tokens=3, do_sample=False).tolist() == \
        ref_model.generate(prompt, max_new_tokens=3, do_sample=False).tolist()
    Path(out_path).write_text(json.dumps({
        "world_size": strategy.world_size, "norms": norms, "ref_norms": ref_norms, "generate_same": same,
        "max_param_diff": _max_diff(state, ref_model.state_dict())}))
    strategy.close()


# ---- the tests ------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args, timeout=900) -> None:
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    cache = Path.home() / ".cache" / "lightrft_mm" / "torch_extensions"  # DeepSpeed's op, built once
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(cache), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, *args], env=env, cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepspeed")
    out = root / "results.json"
    _run(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-port", str(_free_port()), __file__,
          str(out), str(root / "checkpoints")])
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", ["zero1", "zero2", "zero3", "offload", "offload_all"])
def test_sharded_training_matches_one_process_on_the_whole_batch(results, case):
    r = results[case]
    assert r["ref_norms"][0] > CLIP  # clipping was active, so it is compared too
    assert r["norms"] == pytest.approx(r["ref_norms"], rel=NORM_RTOL)
    assert r["norms_per_rank"][0] == r["norms_per_rank"][1]
    assert results["ref_update"] > 100 * PARAM_ATOL  # the tolerance is far below what training moves
    assert r["max_param_diff"] < PARAM_ATOL


@pytest.mark.parametrize("case", ["zero1", "zero2", "zero3"])
def test_full_state_dict_has_the_hf_keys_and_reloads(results, case):
    r = results[case]
    assert r["keys_match"] and not r["missing"] and not r["unexpected"]
    assert r["devices"] == ["cpu"] and r["dtypes"] == ["torch.float32"]
    assert r["other_rank_state"] == 0


@pytest.mark.parametrize("case", ["zero1", "zero2", "zero3", "offload", "offload_all"])
def test_resume_restores_the_optimizer(results, case):
    r = results[case]
    # A fresh Adam state would move the weights by ~lr on the first step: 1e-3, not 1e-7.
    assert r["resumed_norm"] == pytest.approx(r["norms"][2], rel=NORM_RTOL)
    assert r["resumed_diff"] < 1e-7


def test_offload_is_in_effect(results):
    assert results["offload"]["offloaded"] and results["offload_all"]["offloaded"]
    assert not results["zero2"]["offloaded"]


@pytest.mark.parametrize("case", ["zero3", "offload_all"])
def test_zero3_generate_with_synced_gpus_and_a_sharded_reference(results, case):
    first, second = results[case]["generate"]
    assert first["new_tokens"] == 1 and second["new_tokens"] == 4  # rank 0 finished first
    assert first["same_as_reference"] and second["same_as_reference"]
    assert results[case]["frozen_sharded"] and results[case]["frozen_logits_diff"] < 1e-5


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_keeps_fp32_master_weights(results, stage):
    r = results[f"bf16_zero{stage}"]
    assert r["module_dtype"] == "torch.bfloat16" and r["state_dtypes"] == ["torch.float32"]
    # Every tensor moves; the input embedding only in the rows of the tokens the batch holds.
    assert min(r["changed"].values()) > 0
    assert all(v > 0.95 for k, v in r["changed"].items() if k != "model.embed_tokens.weight")
    # bf16 forwards, same gradients up to bf16 rounding (accumulated in fp32).
    assert r["norms"][0] == pytest.approx(results["zero2"]["ref_norms"][0], rel=2e-2)


def test_fp32_precision_casts_a_bf16_model_to_fp32(results):
    assert results["fp32_from_bf16"] == ["torch.float32"]


def test_without_torchrun_it_is_a_world_of_one(tmp_path):
    out = tmp_path / "single.json"
    _run([__file__, "--single", str(out)])
    r = json.loads(out.read_text())
    assert r["world_size"] == 1 and r["generate_same"]
    assert r["norms"] == pytest.approx(r["ref_norms"], rel=NORM_RTOL) and r["max_param_diff"] < PARAM_ATOL


@pytest.mark.parametrize("kw, match", [({"zero_stage": 2, "offload": "all"}, "offload"),
                                       ({"precision": "fp16"}, "fp16")])
def test_impossible_combinations_fail_before_joining_the_process_group(kw, match):
    from lightrft_mm.config.sections import StrategyConfig
    from lightrft_mm.errors import ConfigError
    from lightrft_mm.strategy.deepspeed import DeepSpeedStrategy

    with pytest.raises(ConfigError, match=match):
        DeepSpeedStrategy(StrategyConfig(name="deepspeed", device="cpu", **kw))
    assert not torch.distributed.is_initialized()


def test_importing_the_package_and_the_strategy_module_does_not_import_deepspeed():
    code = ("import sys, lightrft_mm, lightrft_mm.strategy, lightrft_mm.strategy.deepspeed; "
            "assert 'deepspeed' not in sys.modules, 'deepspeed imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


if __name__ == "__main__":
    if sys.argv[1] == "--single":
        single_worker(sys.argv[2])
    else:
        worker(sys.argv[1], sys.argv[2])
