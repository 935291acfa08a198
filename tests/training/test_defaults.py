"""Training settings chosen from the data (`train.epochs`, `train.lr`, `train.batch_size` left out or `auto`)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from microtune.config import load_recipe
from microtune.training.defaults import BATCH_TOKENS, EPOCHS, LR, TARGET_STEPS, data_defaults


def _stats(rows: int, p90: int = 40) -> dict:
    return {"rows": {"train": rows}, "train_tokens": {"p90": p90}}


def _auto(make_recipe, tiny_model_dir: Path, **sections):
    train = {"epochs": None, "lr": None, "batch_size": None} | sections.pop("train", {})
    return load_recipe(make_recipe(tiny_model_dir, train=train, **sections))


def test_left_out_settings_are_auto_and_explicit_ones_are_kept(make_recipe, tiny_model_dir: Path) -> None:
    recipe = _auto(make_recipe, tiny_model_dir)
    assert (recipe.train.epochs, recipe.train.lr, recipe.train.batch_size) == ("auto", "auto", "auto")
    explicit = load_recipe(make_recipe(tiny_model_dir))  # the fixture writes epochs 2, lr 2e-3, batch 4
    same, chosen = data_defaults(explicit, _stats(300))
    assert same is explicit and chosen == {}


@pytest.mark.parametrize("rows, p90, batch, epochs", [
    (300, 40, 8, 8),      # 38 steps a pass: 8 passes ≈ 304 steps
    (600, 40, 8, 4),      # 75 steps a pass
    (5000, 40, 8, 2),     # at least two passes
    (60, 40, 4, 10),      # few rows: batch 4, at most ten passes
    (300, 400, 4, 4),     # long rows: 4 × 400 tokens stays within the batch's token budget
    (300, 2000, 1, 2),    # very long rows: one a batch
])
def test_batch_and_epochs_follow_rows_and_lengths(make_recipe, tiny_model_dir: Path, rows, p90, batch, epochs) -> None:
    recipe, chosen = data_defaults(_auto(make_recipe, tiny_model_dir, train={"max_seq_len": 4096}), _stats(rows, p90))
    assert (recipe.train.batch_size, recipe.train.epochs) == (batch, epochs)
    assert batch * p90 <= BATCH_TOKENS or batch == 1
    assert EPOCHS[0] <= epochs <= EPOCHS[1]
    steps = epochs * -(-rows // batch)
    if EPOCHS[0] < epochs < EPOCHS[1]:  # not clamped: the closest whole number of passes to the step target
        assert abs(steps - TARGET_STEPS) <= -(-rows // batch) / 2 + 1
    assert str(rows) in chosen["train.epochs"].why


def test_the_batch_rule_uses_the_cut_length(make_recipe, tiny_model_dir: Path) -> None:
    """Rows longer than max_seq_len are cut to it before training: the batch is chosen for the cut length."""
    recipe, _ = data_defaults(_auto(make_recipe, tiny_model_dir, train={"max_seq_len": 128}), _stats(300, 2000))
    assert recipe.train.batch_size == 8  # 8 × 128 tokens


@pytest.mark.parametrize("method, family", [({"kind": "lora", "r": 4}, "lora"), ({"kind": "dora", "r": 4}, "lora"),
                                            ({"kind": "full"}, "full"), ({"kind": "ia3"}, "ia3"),
                                            ({"kind": "prompt_tuning"}, "prompt"), ({"kind": "prefix_tuning"}, "prefix")])
def test_learning_rate_by_method_family(make_recipe, tiny_model_dir: Path, method, family) -> None:
    recipe, chosen = data_defaults(_auto(make_recipe, tiny_model_dir, method=method), _stats(300))
    assert recipe.train.lr == LR[family] and method["kind"] in chosen["train.lr"].why


def test_synthetic_rows_count(make_recipe, tiny_model_dir: Path) -> None:
    recipe = _auto(make_recipe, tiny_model_dir)
    assert data_defaults(recipe, _stats(300), extra_rows=900)[0].train.epochs == 2  # 1,200 rows: 150 steps a pass
    assert data_defaults(recipe, _stats(300))[0].train.epochs == 8


def test_check_shows_the_choice_and_the_trained_artifact_records_it(make_recipe, tiny_model_dir: Path, tmp_path: Path) -> None:
    """`microtune check` prints each auto setting with its reason; `train` trains with it, and recipe.json and the MLflow
    parameters hold the chosen number, not `auto`."""
    import mlflow

    from microtune.cli import app
    from microtune.pipeline import train

    path = make_recipe(tiny_model_dir, train={"epochs": None, "lr": None, "batch_size": None})
    ws = tmp_path / "ws"
    result = CliRunner().invoke(app, ["check", str(path), "-w", str(ws)])
    assert result.exit_code == 0, result.output
    assert "train.epochs = 10.0 (auto: 15 train rows" in result.output  # 15 toy rows: batch 4, 4 steps a pass, ten passes
    assert "train.batch_size = 4 (auto:" in result.output and "train.lr = 0.0005 (auto: method lora" in result.output
    adapter = train(path, workspace=ws)
    saved = json.loads((adapter / "recipe.json").read_text())["train"]
    assert (saved["epochs"], saved["batch_size"], saved["lr"]) == (10, 4, 5e-4)
    manifest = json.loads((adapter / "manifest.json").read_text())
    assert manifest["history"][-1]["step"] == 40  # ten passes of four steps
    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow.db'}")
    run = mlflow.get_run(manifest["mlflow_run_id"])
    assert run.data.params["train.epochs"] == "10.0" and run.data.params["train.batch_size"] == "4"


def test_train_adapter_called_directly_chooses_too(make_recipe, tiny_model_dir: Path, tmp_path: Path) -> None:
    """A caller that skips the check step (``train_adapter``) gets the same rule, from the encoded rows."""
    from microtune.data import build_dataset, write_dataset
    from microtune.models import resolve_base
    from microtune.training import train_adapter

    recipe = _auto(make_recipe, tiny_model_dir)
    data = build_dataset(recipe)
    folder = tmp_path / "data"
    folder.mkdir()
    write_dataset(data, folder)
    out = train_adapter(recipe, resolve_base(recipe.model), folder, data.labels, tmp_path / "adapter")
    assert out["history"][-1]["step"] == 40


def test_a_tune_trial_chooses_after_its_own_overrides(make_recipe, tiny_model_dir: Path) -> None:
    """A trial that draws batch size 16 trains the epochs of batch 16; a drawn value is never replaced."""
    from microtune.pipeline.tune import _Job

    declared = _auto(make_recipe, tiny_model_dir)
    job = _Job(declared, Path("."), "sqlite://", "s", 1, None, None, Path("."), [], "accuracy", "maximize", [], declared, _stats(300))
    assert (job.trial_recipe([]).train.batch_size, job.trial_recipe([]).train.epochs) == (8, 8)
    drawn = job.trial_recipe(["train.batch_size=16"]).train
    assert (drawn.batch_size, drawn.epochs) == (16, 10)  # 19 steps a pass
    assert job.trial_recipe(["train.epochs=1", "train.lr=0.01"]).train.epochs == 1
    assert job.trial_recipe(["train.epochs=1", "train.lr=0.01"]).train.lr == 0.01


def test_gradient_checkpointing_auto_is_on_for_a_4bit_base_only(make_recipe, tiny_model_dir: Path) -> None:
    """`auto` (the default): qlora recomputes activations (chosen, with the reason `check` shows), lora does not; an
    explicit value is kept; a lora recipe's hash is the one it had when the key's default was false."""
    from microtune.pipeline.lineage import recipe_hash
    from microtune.training.defaults import uses_checkpointing

    lora = load_recipe(make_recipe(tiny_model_dir))
    assert lora.train.gradient_checkpointing == "auto" and not uses_checkpointing(lora)
    assert data_defaults(lora, _stats(300))[1] == {}
    assert recipe_hash(lora) == recipe_hash(lora.with_overrides(["train.gradient_checkpointing=false"]))
    qlora = load_recipe(make_recipe(tiny_model_dir, method={"kind": "qlora", "r": 4}))
    resolved, chosen = data_defaults(qlora, _stats(300))
    assert uses_checkpointing(qlora) and resolved.train.gradient_checkpointing is True
    assert "4-bit base" in chosen["train.gradient_checkpointing"].why
    assert recipe_hash(qlora) == recipe_hash(resolved)
    off = qlora.with_overrides(["train.gradient_checkpointing=false"])
    assert not uses_checkpointing(off) and data_defaults(off, _stats(300))[1] == {}
