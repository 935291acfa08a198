"""Engine features: class balancing, weighted loss, early stopping, best weights, cost, resume after kill -9."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from microtune.data.balance import label_weights
from microtune.training.batching import collate, iterate_batches
from microtune.training.engine import completion_loss, resolve_balance
from toydata import write_jsonl


def test_balanced_sampling_evens_out_labels() -> None:
    labels = ["a"] * 90 + ["b"] * 9 + ["c"] * 1
    weights = label_weights(labels, power=1.0)
    drawn = Counter(labels[i] for _, b in iterate_batches([5] * 100, 10, seed=3, total=300, weights=weights) for i in b)
    shares = {k: v / sum(drawn.values()) for k, v in drawn.items()}
    assert all(0.25 < s < 0.42 for s in shares.values()), shares
    plain = Counter(labels[i] for _, b in iterate_batches([5] * 100, 10, seed=3, total=30) for i in b)
    assert plain["a"] == 270


def test_balance_auto_follows_the_check_rule() -> None:
    assert resolve_balance("auto", ["a"] * 80 + ["b"] * 20) == "sample"
    assert resolve_balance("auto", ["a"] * 40 + ["b"] * 30 + ["c"] * 30) == "none"
    assert resolve_balance("weight", ["a", "b"]) == "weight"


def test_weighted_loss_is_the_weighted_token_mean(tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    rows = [([11, 12, 13], [14, 15]), ([21, 22], [23, 24])]
    with torch.no_grad():
        a, _ = completion_loss(model, collate(rows[:1], 0))
        b, _ = completion_loss(model, collate(rows[1:], 0))
        mixed, _ = completion_loss(model, collate(rows, 0, weights=[3.0, 1.0]))
    assert float(mixed) == pytest.approx((3 * float(a) + float(b)) / 4, rel=1e-5)


@pytest.mark.slow
def test_early_stopping_and_best_weights(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    from microtune import pipeline

    write_jsonl(tmp_path / "valid.jsonl", [{"text": "refund my order now", "label": "refund"}])
    recipe = make_recipe(tiny_model_dir, train={"max_steps": 200, "lr": 0.5, "eval_steps": 1, "early_stopping_patience": 2})
    text = recipe.read_text().replace("split:\n    valid: 0.0\n", "valid: valid.jsonl\n")
    recipe.write_text(text)
    adapter = pipeline.train(recipe, workspace=tmp_path / "ws")
    final = json.loads((adapter / "manifest.json").read_text())["final"]
    valid = json.loads((adapter / "manifest.json").read_text())["valid_history"]
    assert final["stopped_early"] and final["steps"] < 200
    assert final["best_valid_loss"] == min(v["valid_loss"] for v in valid)
    assert valid[-1]["valid_loss"] > final["best_valid_loss"]  # it stopped because the last ones were worse


@pytest.mark.slow
def test_cost_report(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    from microtune import pipeline

    full = pipeline.train(make_recipe(tiny_model_dir, method={"kind": "full"}, train={"max_steps": 2}),
                          workspace=tmp_path / "ws")
    lora = pipeline.train(make_recipe(tiny_model_dir, train={"max_steps": 2}), workspace=tmp_path / "ws")
    cost = json.loads((lora / "manifest.json").read_text())["cost"]
    assert cost["trainable_params"] < cost["total_params"] and cost["tokens_seen"] > 0
    assert cost["achieved_flops_per_s"] > 0 and set(cost["gpu_estimates"]) >= {"T4", "A100-80GB", "H100-SXM"}
    assert cost["assumptions"]["mfu"] == 0.30
    assert cost["full_finetune"]["source"] == "measured" and cost["full_finetune"]["adapter"] == str(full)
    assert cost["saving"]["flops_ratio_vs_full"] == pytest.approx(4 / 6)


def _train_cmd(recipe: Path, ws: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "microtune.cli", "train", str(recipe), "-w", str(ws), *extra]


@pytest.mark.slow
def test_resume_after_kill_9_matches_an_uninterrupted_run(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    from safetensors.torch import load_file

    recipe = make_recipe(tiny_model_dir, train={"max_steps": 160, "save_steps": 20, "lr": 1e-3, "epochs": 1})
    env = {**os.environ, "CI": "1"}
    ws = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(recipe, ws), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts = ws / "toy" / "checkpoints"
    deadline = time.monotonic() + 600  # a safety net against a hang, not part of what is tested
    # any checkpoint from step 40 on will do (only the last two are kept, so waiting for exactly step 40 races the trainer)
    while time.monotonic() < deadline and not any(int(p.name.removeprefix("step-")) >= 40 for p in ckpts.glob("*/step-*")):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list((ws / "toy" / "adapters").glob("*/manifest.json")) if (ws / "toy" / "adapters").exists() else True
    resumed = subprocess.run(_train_cmd(recipe, ws, "--resume"), env=env, capture_output=True, text=True, timeout=1200)  # safety nets
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    straight = subprocess.run(_train_cmd(recipe, tmp_path / "straight"), env=env, capture_output=True, text=True, timeout=1200)
    assert straight.returncode == 0, straight.stderr[-2000:]
    (a,) = (ws / "toy" / "adapters").glob("*/adapter_model.safetensors")
    (b,) = (tmp_path / "straight" / "toy" / "adapters").glob("*/adapter_model.safetensors")
    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert (wa[key] - wb[key]).abs().max() < 1e-5, key
    manifest = json.loads(a.with_name("manifest.json").read_text())
    assert manifest["final"]["resumed"] and manifest["final"]["steps"] == 160
    assert not list(ckpts.glob("*/step-*"))  # spent checkpoints are removed
    assert not [p for p in ws.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]  # the killed writer's temp folders too


def test_resume_with_nothing_to_resume(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    from typer.testing import CliRunner

    from microtune.cli import app

    result = CliRunner().invoke(app, ["train", str(make_recipe(tiny_model_dir)), "-w", str(tmp_path), "--resume"])
    assert result.exit_code == 2 and "nothing to resume" in result.output and "train.save_steps" in result.output


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    """torchrun with 2 CPU ranks (gloo) gives the adapter one process gives with the same global batch."""
    from safetensors.torch import load_file

    recipe = make_recipe(tiny_model_dir, train={"max_steps": 6, "bf16": False, "lr": 5e-3, "batch_size": 4})
    env = {**os.environ, "CI": "1", "OMP_NUM_THREADS": "1"}
    runs = {}
    for nproc in (1, 2):
        ws = tmp_path / f"ws{nproc}"
        proc = subprocess.run(_train_cmd(recipe, ws, "--nproc", str(nproc)), env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (adapter,) = (ws / "toy" / "adapters").iterdir()  # only rank 0 writes
        runs[nproc] = adapter
    one, two = (load_file(runs[n] / "adapter_model.safetensors") for n in (1, 2))
    assert one.keys() == two.keys()
    for key in one:
        assert (one[key] - two[key]).abs().max() < 1e-4, key
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'ws2' / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "toy"]
    assert len(client.search_runs([experiment.experiment_id])) == 1  # one MLflow run, from rank 0


@pytest.mark.slow
def test_ddp_needs_a_batch_per_rank(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    recipe = make_recipe(tiny_model_dir, train={"max_steps": 2, "batch_size": 1})
    proc = subprocess.run(_train_cmd(recipe, tmp_path / "ws", "--nproc", "2"), env={**os.environ, "CI": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "train.batch_size 1 is smaller than the 2 processes" in proc.stderr


@pytest.mark.slow
def test_ddp_rank_without_rows_in_a_short_last_batch(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    """15 rows in batches of 7 end an epoch with a 1-row batch: rank 1 gets no row, runs one at weight 0 (so the
    collectives line up) and the 2-process adapter still equals the 1-process one."""
    from safetensors.torch import load_file

    recipe = make_recipe(tiny_model_dir, train={"max_steps": 3, "bf16": False, "lr": 5e-3, "batch_size": 7})
    env = {**os.environ, "CI": "1", "OMP_NUM_THREADS": "1"}
    weights = []
    for nproc in (1, 2):
        proc = subprocess.run(_train_cmd(recipe, tmp_path / f"ws{nproc}", "--nproc", str(nproc)), env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (adapter,) = (tmp_path / f"ws{nproc}" / "toy" / "adapters").glob("*/adapter_model.safetensors")
        weights.append(load_file(adapter))
    for key in weights[0]:
        assert (weights[0][key] - weights[1][key]).abs().max() < 1e-4, key
