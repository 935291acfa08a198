"""FSDP (train.distributed.strategy: fsdp): real torchrun runs with 2 CPU ranks (gloo) against one process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from microtune.config import load_recipe, validate_recipe
from microtune.core.errors import RecipeError

ENV = {**os.environ, "CI": "1", "OMP_NUM_THREADS": "1"}
FSDP = "train.distributed.strategy=fsdp"


def _train(recipe: Path, ws: Path, nproc: int, *sets: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "microtune.cli", "train", str(recipe), "-w", str(ws), "--nproc", str(nproc),
           *[x for s in sets for x in ("--set", s)]]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)


def _why(proc: subprocess.CompletedProcess) -> str:
    """The error lines of every rank (torchrun's own summary buries them)."""
    lines = proc.stderr.splitlines()
    hits = [i for i, line in enumerate(lines) if "Error" in line or "error:" in line]
    return "\n".join(dict.fromkeys(x for i in hits for x in lines[max(0, i - 6):i + 1])) or proc.stderr[-3000:]


def _one_and_two(recipe: Path, tmp_path: Path, *sets: str) -> tuple[Path, Path, str]:
    """The adapter of 1 process and of 2 FSDP ranks, and the 1-process stderr."""
    one = _train(recipe, tmp_path / "one", 1, FSDP, *sets)
    assert one.returncode == 0, _why(one)
    two = _train(recipe, tmp_path / "two", 2, FSDP, *sets)
    assert two.returncode == 0, _why(two)
    (a,) = (tmp_path / "one" / "toy" / "adapters").iterdir()
    (b,) = (tmp_path / "two" / "toy" / "adapters").iterdir()  # only rank 0 writes: one artifact
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())  # the same files
    return a, b, one.stderr


def _same_weights(a: Path, b: Path, file: str, tol: float) -> dict:
    from safetensors.torch import load_file

    wa, wb = load_file(a / file), load_file(b / file)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert wa[key].shape == wb[key].shape and wa[key].dtype == wb[key].dtype, key
        assert (wa[key] - wb[key]).abs().max() < tol, key
    return wb


def _manifests(a: Path, b: Path) -> tuple[dict, dict]:
    return tuple(json.loads((x / "manifest.json").read_text()) for x in (a, b))


def _halved(ma: dict, mb: dict) -> None:
    """Each of 2 FSDP ranks holds about half the parameters and optimizer state one process holds (shards are padded
    to equal size, hence not exactly half)."""
    one, two = ma["cost"]["distributed"], mb["cost"]["distributed"]
    assert (one["strategy"], one["ranks"], two["strategy"], two["ranks"]) == ("none", 1, "fsdp", 2)
    for part in ("params", "optimizer"):
        assert 0.45 < two["state_mb_per_rank"][part] / one["state_mb_per_rank"][part] < 0.6, (part, one, two)


@pytest.mark.slow
def test_two_fsdp_ranks_give_the_one_process_adapter(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    """LoRA with validation and best-weight keeping: 2 sharded ranks write the adapter 1 process writes.

    One process with strategy fsdp trains unsharded (nothing to shard across) and says so. Tolerance 1e-4, as for
    ddp: the runs differ only in float32 summation order (per-rank partial sums reduce-scattered vs one sum),
    ~1e-7 relative per gradient; measured differences after 6 Adam steps at lr 5e-3 are ~2e-5."""
    data = {"train": "train.jsonl", "test": "test.jsonl", "split": {"valid": 0.3}}
    make_recipe(tiny_model_dir)  # writes the data files
    recipe = make_recipe(tiny_model_dir, data=data, train={"max_steps": 6, "bf16": False, "lr": 5e-3, "batch_size": 4, "eval_steps": 2})
    a, b, one_err = _one_and_two(recipe, tmp_path)
    assert "nothing to shard across, training unsharded" in one_err
    wb = _same_weights(a, b, "adapter_model.safetensors", 1e-4)
    assert any("lora_A" in k for k in wb) and all(wb[k].abs().max() > 0 for k in wb if "lora_B" in k)  # trained (B starts at 0)
    ma, mb = _manifests(a, b)
    assert json.loads((b / "recipe.json").read_text())["train"]["distributed"] == {
        "strategy": "fsdp", "fsdp": {"reshard_after_forward": True, "cpu_offload": False}}
    assert len(mb["valid_history"]) == 3
    for m in ("train_loss", "best_valid_loss"):
        assert mb["final"][m] == pytest.approx(ma["final"][m], rel=1e-4)
    assert (mb["cost"]["trainable_params"], mb["cost"]["total_params"]) == (ma["cost"]["trainable_params"], ma["cost"]["total_params"])
    _halved(ma, mb)
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'two' / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "toy"]
    assert len(client.search_runs([experiment.experiment_id])) == 1  # one MLflow run, from rank 0


@pytest.mark.slow
def test_fsdp_full_finetune_with_packing_and_accumulation(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    """method full (every weight sharded and gathered at the end, tied LM head kept tied), packed rows, 2 micro-batches
    per step, layers kept gathered between forward and backward: the same model.safetensors as 1 process (tolerance
    as above)."""
    recipe = make_recipe(tiny_model_dir, method={"kind": "full"},
                         train={"max_steps": 3, "bf16": False, "lr": 1e-4, "batch_size": 4, "grad_accum": 2, "packing": True})
    a, b, _ = _one_and_two(recipe, tmp_path, "train.distributed.fsdp.reshard_after_forward=false")
    wb = _same_weights(a, b, "model.safetensors", 1e-4)
    assert "lm_head.weight" not in wb and "model.embed_tokens.weight" in wb  # tied, as an unsharded save writes it
    ma, mb = _manifests(a, b)
    assert mb["final"]["steps"] == 3 and mb["final"]["train_loss"] == pytest.approx(ma["final"]["train_loss"], rel=1e-4)
    _halved(ma, mb)


@pytest.mark.slow
def test_fsdp_cpu_offload_needs_cuda(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    proc = _train(make_recipe(tiny_model_dir, train={"max_steps": 1}), tmp_path / "ws", 2, FSDP,
                  "train.distributed.fsdp.cpu_offload=true")
    assert proc.returncode != 0
    assert "train.distributed.fsdp.cpu_offload needs CUDA devices" in proc.stderr
    assert "set train.distributed.fsdp.cpu_offload=false" in proc.stderr
    adapters = tmp_path / "ws" / "toy" / "adapters"
    assert not [p for p in adapters.iterdir() if not p.name.startswith(".")] if adapters.exists() else True  # nothing published


@pytest.mark.parametrize(("sets", "message"), [
    ([FSDP, "method.kind=qlora"], "cannot shard qlora's 4-bit (bitsandbytes) base weights; use method.kind=lora"),
    ([FSDP, "method.kind=prefix_tuning"], "does not support method.kind=prefix_tuning"),
    ([FSDP, "train.save_steps=10"], "train.save_steps (resumable checkpoints) is not supported with train.distributed.strategy=fsdp"),
    (["train.distributed.strategy=deepspeed"], "strategy 'deepspeed' is not supported by microtune; use strategy: fsdp"),
    (["train.distributed.strategy=zero3"], "Input should be 'ddp' or 'fsdp'"),
    (["train.distributed.fsdp.cpu_offload=true"], "fsdp settings are given but strategy is 'ddp'"),
    ([FSDP, "train.distributed.fsdp.offload=true"], "unknown key 'offload'; did you mean 'cpu_offload'?"),
])
def test_recipes_fsdp_cannot_train_are_rejected(make_recipe, tiny_model_dir: Path, sets: list[str], message: str) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(make_recipe(tiny_model_dir), sets)
    assert message in " ".join(str(p) for p in info.value.problems)


def test_default_strategy_is_ddp_and_resolved_recipes_reload(make_recipe, tiny_model_dir: Path) -> None:
    """The recipe.json an adapter carries spells out the fsdp defaults; it must validate again (eval, serve load it)."""
    ddp = load_recipe(make_recipe(tiny_model_dir))
    assert ddp.train.distributed.strategy == "ddp"
    fsdp = load_recipe(make_recipe(tiny_model_dir), [FSDP, "method.kind=ia3", "train.distributed.fsdp.reshard_after_forward=false"])
    for recipe in (ddp, fsdp):
        assert validate_recipe(recipe.resolved()).train.distributed == recipe.train.distributed
