"""The training loop's parts: events instead of prints, the checkpointed state, the ddp strategy on every method."""
from __future__ import annotations

from pathlib import Path

import pytest

from microtune.core.progress import Event
from microtune.training.state import TrainState
from toydata import TINY_METHODS

DATA = {"train": "train.jsonl", "test": "test.jsonl", "split": {"valid": 0.3}}


def _train(make_recipe, tiny_model_dir: Path, tmp_path: Path, out: str, reporter=None, **kwargs) -> dict:
    """``train_adapter`` called directly on a checked toy dataset (5 steps, log every 2, validate every 2)."""
    from microtune import pipeline
    from microtune.models import resolve_base
    from microtune.training import train_adapter

    make_recipe(tiny_model_dir)  # writes the data files
    train = {"max_steps": 5, "log_every": 2, "eval_steps": 2, "bf16": False, **kwargs.pop("train", {})}
    checked = pipeline.check(make_recipe(tiny_model_dir, data=DATA, train=train), workspace=tmp_path / "ws")
    return train_adapter(checked.recipe, resolve_base(checked.recipe.model), checked.dataset_dir, checked.manifest["labels"],
                         tmp_path / out, reporter=reporter, **kwargs)


def test_events_arrive_in_order_with_the_right_totals(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    events: list[Event] = []
    result = _train(make_recipe, tiny_model_dir, tmp_path, "out", reporter=events.append)
    assert {e.stage for e in events} == {"train"}
    assert [(e.kind, e.step) for e in events if e.kind != "metrics"] == \
        [("start", 0)] + [("progress", s) for s in range(1, 6)] + [("done", 5)]
    assert {e.total for e in events} == {5}
    progress = [e for e in events if e.kind == "progress"]
    assert all(set(e.data) == {"loss", "lr", "tokens_per_s"} and e.data["tokens_per_s"] > 0 for e in progress)
    train_metrics = [e for e in events if e.kind == "metrics" and "loss" in e.data]
    assert [e.step for e in train_metrics] == [2, 4, 5]  # every log_every steps, and the last
    assert [{"step": e.step, **e.data} for e in train_metrics] == result["history"]
    assert [e.data for e in train_metrics] == [e.data for e in progress if e.step in (2, 4, 5)]
    valid_metrics = [e for e in events if e.kind == "metrics" and "valid_loss" in e.data]
    assert [{"step": e.step, **e.data} for e in valid_metrics] == result["valid_history"] and len(valid_metrics) == 3
    order = [(e.step, e.kind, "valid_loss" in e.data) for e in events]
    assert order.index((2, "progress", False)) < order.index((2, "metrics", False)) < order.index((2, "metrics", True)) \
        < order.index((3, "progress", False))
    assert events[-1].data["steps"] == 5 and events[-1].data == result["final"]


def test_warm_up_starts_above_zero_then_decays_linearly(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    """4 steps, warm-up 2 steps: the steps run at lr × 1/3, 2/3, 1, 1/2 (no step at lr 0, as transformers' warm-up gives
    step 0); each progress event reports the rate of the step after it, down to 0 after the last."""
    from microtune.training.setup import lr_factor

    events: list[Event] = []
    _train(make_recipe, tiny_model_dir, tmp_path, "warm", reporter=events.append,
           train={"max_steps": 4, "lr": 3e-3, "warmup_ratio": 0.5, "log_every": 1})
    reported = [e.data["lr"] for e in events if e.kind == "progress"]
    assert reported == pytest.approx([2e-3, 3e-3, 1.5e-3, 0.0])
    assert [lr_factor(s, warmup=2, steps=4) for s in range(4)] == pytest.approx([1 / 3, 2 / 3, 1, 0.5])
    assert lr_factor(0, warmup=1, steps=30) == 0.5  # the one-epoch benchmark's warm-up: its first step trains
    assert [lr_factor(s, warmup=0, steps=2) for s in range(2)] == [1.0, 0.5]


def test_training_prints_nothing(tmp_path: Path, make_recipe, tiny_model_dir: Path, capfd: pytest.CaptureFixture[str]) -> None:
    result = _train(make_recipe, tiny_model_dir, tmp_path, "quiet", train={"max_steps": 3, "log_every": 1})
    assert result["final"]["steps"] == 3
    assert capfd.readouterr() == ("", "")


def test_resumed_run_starts_from_its_checkpoint(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    """A run stopped after its step-2 checkpoint resumes at step 2: ``start`` says so, steps 3.. follow."""
    import json

    ckpt = tmp_path / "ckpt"
    _train(make_recipe, tiny_model_dir, tmp_path, "first", checkpoint_dir=ckpt, run_meta={"recipe_hash": "h"},
           train={"max_steps": 4, "save_steps": 2})
    (saved,) = ckpt.glob("step-*")  # step 2 (the last step writes no checkpoint: the run is done)
    state = json.loads((saved / "state.json").read_text())
    assert state["step"] == 2 and state["recipe_hash"] == "h" and state["micro"] == 2
    events: list[Event] = []
    result = _train(make_recipe, tiny_model_dir, tmp_path, "second", reporter=events.append, checkpoint_dir=ckpt, resume=True,
                    train={"max_steps": 4, "save_steps": 2})
    assert (events[0].kind, events[0].step, events[0].total) == ("start", 2, 4)
    assert [e.step for e in events if e.kind == "progress"] == [3, 4]
    assert result["final"]["resumed"] and result["final"]["steps"] == 4
    assert [h["step"] for h in result["history"]] == [2, 4]  # the first run's step-2 record came back with the state


def test_train_state_round_trips_through_a_dict() -> None:
    state = TrainState(step=7, micro=14, tokens=900, elapsed=1.5, history=[{"step": 5, "loss": 1.0}], best_loss=0.5,
                       meta={"mlflow_run_id": "abc", "recipe_hash": "h"})
    flat = state.to_dict()
    assert list(flat)[:2] == ["step", "micro"] and flat["mlflow_run_id"] == "abc" and "meta" not in flat
    assert TrainState.from_dict(flat) == state
    assert state.observe_valid(0.7) is False and state.since_best == 1
    assert state.observe_valid(0.4) is True and (state.best_loss, state.since_best) == (0.4, 0)
    assert state.valid == [{"step": 7, "valid_loss": 0.7}, {"step": 7, "valid_loss": 0.4}]


METHODS = TINY_METHODS


@pytest.fixture
def process_group(tmp_path: Path):
    """A one-rank gloo group in this process, so DDP can wrap a model without torchrun."""
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    tdist.destroy_process_group()


@pytest.mark.parametrize("kind", list(METHODS))
def test_ddp_strategy_accumulates_like_one_process(kind: str, process_group, make_recipe, tiny_model_dir: Path) -> None:
    """Through DDP (the loss wrapped as its root, no_sync on the first micro-batch, the summing comm hook) two
    accumulated micro-batches give the gradients of the plain loss, for every method: no trainable parameter is
    left out of the graph (DDP would fail the next step, as find_unused_parameters is off)."""
    import torch

    from microtune.config import load_recipe
    from microtune.models import resolve_base
    from microtune.training.batching import collate
    from microtune.training.loss import completion_loss
    from microtune.training.setup import build_model
    from microtune.training.strategy import Ddp

    recipe = load_recipe(make_recipe(tiny_model_dir, method=METHODS[kind]))
    model = build_model(recipe, resolve_base(recipe.model))
    halves = [collate([([11, 12, 13, 14, 15], [16, 17]), ([11, 12, 13, 22], [24, 25, 26])], 0), collate([([21, 22, 23], [24])], 0)]

    def grads() -> dict[str, torch.Tensor]:
        out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out

    for half in halves:
        completion_loss(model, half)[0].backward()
    plain = grads()
    ddp = Ddp()
    ddp.wrap(model, recipe.train)
    for _ in range(2):  # the second round would raise if the first left a gradient bucket unreduced
        for i, half in enumerate(halves):
            with ddp.micro_batch(sync=i == 1):
                ddp.loss(half)[0].backward()
        wrapped = grads()
    assert wrapped.keys() == plain.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    for name in plain:
        assert torch.allclose(wrapped[name], plain[name], atol=1e-6, rtol=1e-5), name


def test_two_ddp_ranks_with_accumulation_give_the_one_process_adapter(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    """torchrun with 2 gloo ranks, 2 micro-batches per step (the first under no_sync) and an epoch-closing 1-row batch
    (rank 1 runs a weight-0 row): the adapter and the losses of one process. Tolerance as in test_train's ddp tests."""
    import json
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    recipe = make_recipe(tiny_model_dir, train={"max_steps": 3, "grad_accum": 2, "bf16": False, "lr": 5e-3, "batch_size": 7})
    env = {**os.environ, "CI": "1", "OMP_NUM_THREADS": "1"}
    adapters = []
    for nproc in (1, 2):
        ws = tmp_path / f"ws{nproc}"
        cmd = [sys.executable, "-m", "microtune.cli", "train", str(recipe), "-w", str(ws), "--nproc", str(nproc)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (adapter,) = (ws / "toy" / "adapters").iterdir()
        adapters.append(adapter)
    one, two = (load_file(a / "adapter_model.safetensors") for a in adapters)
    assert one.keys() == two.keys()
    for key in one:
        assert (one[key] - two[key]).abs().max() < 1e-4, key
    ma, mb = (json.loads((a / "manifest.json").read_text()) for a in adapters)
    assert mb["cost"]["distributed"]["strategy"] == "ddp" and mb["final"]["steps"] == 3
    assert [h["loss"] for h in mb["history"]] == pytest.approx([h["loss"] for h in ma["history"]], rel=1e-4)
    assert mb["cost"]["tokens_seen"] == ma["cost"]["tokens_seen"]
