"""`microtune tune`: the search space section, the draw of a trial's settings, and whole studies on the tiny model
(trials scored on valid while the test split is absent, nested MLflow runs, a dead process's trial failed and redone,
two worker processes sharing one SQLite study)."""
from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from microtune.config import load_recipe
from microtune.core.errors import RecipeError
from toydata import LABELS, TEXTS, toy_rows, write_jsonl

SRC = Path(__file__).resolve().parents[2] / "src"


def _recipe(tmp_path: Path, base: str | Path, **tune: object) -> Path:
    """Train, valid and test files of the toy data and a recipe with a tiny `tune` space (two settings, 2-step trials)."""
    write_jsonl(tmp_path / "train.jsonl", toy_rows(5))
    write_jsonl(tmp_path / "valid.jsonl", [{"text": TEXTS[l][6], "label": l} for l in LABELS])
    write_jsonl(tmp_path / "test.jsonl", [{"text": TEXTS[l][7], "label": l} for l in LABELS])
    recipe = {"name": "toy", "task": {"type": "classify", "instruction": "Route the customer message.", "labels": LABELS},
              "data": {"train": "train.jsonl", "valid": "valid.jsonl", "test": "test.jsonl"}, "model": {"base": str(base)},
              "train": {"max_steps": 2, "eval_steps": 1, "batch_size": 4, "max_seq_len": 96, "log_every": 1},
              "eval": {"batch_size": 8},
              "tune": {"defaults": False, "startup_trials": 1,
                       "space": {"train.lr": {"low": 1.0e-4, "high": 5.0e-2, "log": True}, "method.r": {"choices": [2, 4]}}, **tune}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_the_tune_section_is_checked_at_its_yaml_lines(tmp_path: Path) -> None:
    path = _recipe(tmp_path, "x", methods=["lora", "iaa3"], metric="rouge")
    raw = yaml.safe_load(path.read_text())
    raw["tune"]["space"] |= {"train.lrr": {"low": 1, "high": 2}, "train.batch_size": {"low": 0, "high": 8}, "method.kind": {"choices": ["ia3"]}}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    text = "\n".join(map(str, caught.value.problems))
    lines = path.read_text().splitlines()
    for key, message in [("train.lrr:", "'train.lrr' is not a searchable setting"), ("train.batch_size:", "0 is not a valid train.batch_size"),
                         ("method.kind:", "'method.kind' is not a searchable setting"), ("methods:", "unknown method kind(s) ['iaa3']"),
                         ("metric:", "tune.metric 'rouge' is not reported")]:
        line = next(i for i, x in enumerate(lines, 1) if x.strip().startswith(key))
        assert f"recipe.yaml:{line} " in next(p for p in text.splitlines() if message in p), (key, text)
    raw["tune"] = {"space": {"train.lr": {"low": 0.1}}}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(RecipeError, match="problem"):
        load_recipe(path)


def test_a_trial_draws_each_kinds_own_space_as_valid_overrides(tmp_path: Path) -> None:
    import optuna

    from microtune.pipeline.tune import default_space, suggest

    recipe = load_recipe(_recipe(tmp_path, "x", defaults=True, methods=["lora", "ia3", "prompt_tuning"],
                                 space={"train.batch_size": None, "method.r": {"choices": [2, 4]}}))
    assert set(default_space(recipe, "lora")) >= {"train.lr", "train.max_steps", "method.r", "method.alpha", "train.balance"}
    highs = [default_space(recipe, kind)["train.lr"].high for kind in ("full", "lora", "prompt_tuning")]
    assert highs == sorted(highs) and len(set(highs)) == 3  # full fine-tuning lowest, prompt learning highest
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    kinds = set()
    for _ in range(12):
        trial = study.ask()
        tuned = recipe.with_overrides(suggest(trial, recipe))  # every draw is a valid recipe
        kinds.add(tuned.method.kind)
        assert "train.batch_size" not in trial.params and tuned.train.batch_size == 4  # null dropped the default
        assert 1 <= tuned.train.max_steps <= 4 and isinstance(trial.params["train.max_steps"], int)
        assert (tuned.method.r in (2, 4)) if tuned.method.kind == "lora" else "method.r" not in trial.params
        assert ("train.balance_power" in trial.params) == (tuned.train.balance != "none")
        study.tell(trial, 0.5)
    assert kinds == {"lora", "ia3", "prompt_tuning"}


def test_a_new_study_starts_from_the_recipes_own_settings_and_ties_keep_them(tmp_path: Path) -> None:
    import optuna

    from microtune.pipeline.tune import _best, recipe_point, suggest

    recipe = load_recipe(_recipe(tmp_path, "x", defaults=True, space={"method.r": {"choices": [2, 4]}})).with_overrides(["train.lr=0.002"])
    point = recipe_point(recipe)
    assert point["train.lr"] == recipe.train.lr and point["train.max_steps"] == recipe.train.max_steps
    assert "method.r" not in point and recipe.method.r not in (2, 4)  # outside the space: left to the sampler
    assert "train.balance" not in point  # `auto` is no choice of the space; with the training labels it is resolved:
    assert recipe_point(recipe, ["a"] * 9 + ["b"])["train.balance"] == "sample"
    assert recipe_point(recipe, LABELS * 3)["train.balance"] == "none"
    point = recipe_point(recipe, LABELS * 3)
    assert "train.balance_power" not in point  # balancing off: the power changes nothing, so it is not drawn
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial(point)
    first = study.ask()
    own = recipe.with_overrides(suggest(first, recipe))
    assert own.train == recipe.with_overrides(["train.balance=none"]).train and own.method.alpha == recipe.method.alpha and own.method.r in (2, 4)
    study.tell(first, 0.5)
    for value in (0.5, 0.25):  # a later trial must beat the recipe's own settings to replace them
        trial = study.ask()
        suggest(trial, recipe)
        study.tell(trial, value)
    assert _best(study).number == 0
    trial = study.ask()
    suggest(trial, recipe)
    study.tell(trial, 0.75)
    assert _best(study).number == 3
    other = load_recipe(_recipe(tmp_path, "x", defaults=True, methods=["ia3"]))
    assert recipe_point(other) == {}  # the recipe's own kind is not searched: no point of this space


@pytest.mark.slow
def test_tune_scores_on_valid_never_reads_test_and_resumes_a_dead_processes_study(tmp_path: Path, tiny_model_dir: Path) -> None:
    import mlflow
    import optuna

    from microtune import pipeline

    recipe, ws = _recipe(tmp_path, tiny_model_dir), tmp_path / "ws"
    original = recipe.read_text()
    dataset = pipeline.check(recipe, workspace=ws).dataset_dir
    (dataset / "test.jsonl").unlink()  # every stage reads the test split from here: tune must never need it
    storage = f"sqlite:///{ws / 'toy' / 'tune' / 'study.db'}"
    (ws / "toy" / "tune").mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    orphan = optuna.create_study(storage=storage, study_name="toy", direction="maximize").ask()  # a crashed worker's trial
    orphan.set_user_attr("microtune.owner", {"host": socket.gethostname(), "pid": int(dead.stdout), "start": ""})
    events = []
    result = pipeline.tune(recipe, workspace=ws, trials=3, reporter=events.append)
    study = optuna.load_study(study_name="toy", storage=storage)
    states = [t.state.name for t in study.trials]
    assert states[0] == "FAIL" and len(states) == 4 and set(states[1:]) <= {"COMPLETE", "PRUNED"} and "COMPLETE" in states
    assert not (dataset / "test.jsonl").exists() and recipe.read_text() == original
    assert result.metric == "accuracy" and 0.0 <= result.best_value <= 1.0 and result.best_value == study.best_value
    tuned = result.tuned_recipe
    assert tuned == tmp_path / "recipe.tuned.yaml" and tuned.read_text().startswith("# Tuned by `microtune tune`: study 'toy'")
    again = load_recipe(tuned)
    assert again.train.lr == pytest.approx(study.best_params["train.lr"]) and again.method.r == study.best_params["method.r"]
    assert again.data.train == load_recipe(recipe).data.train  # the original's relative paths still resolve
    rows = list(csv.DictReader((result.folder / "trials.csv").open()))
    assert [r["state"] for r in rows] == states and {"train.lr", "method.r", "valid_loss"} <= set(rows[0])
    assert all((r["value"] != "") == (r["state"] == "COMPLETE") for r in rows)
    assert (result.folder / "history.png").stat().st_size > 1000
    done = [r["value"] for r in rows if r["state"] == "COMPLETE"]
    summary = json.loads((result.folder / "summary.json").read_text())
    if result.importances:  # once two trials completed: one importance per searched setting
        assert set(result.importances) == {"train.lr", "method.r"} and len(done) >= 2 and not summary["importances_note"]
    else:  # fewer than two, or (Optuna 4) trials that all scored the same: the summary says why
        assert summary["importances_note"] and (len(done) < 2 or len(set(done)) == 1)
    assert any(e.stage == "train" and e.kind == "progress" for e in events)  # each trial's training reached the reporter
    assert sum(e.stage == "tune" and e.kind == "message" for e in events) == 3
    client = mlflow.MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("toy").experiment_id])
    parent = study.user_attrs["mlflow_parent_run_id"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    assert len(children) == 3 and {r.data.tags["microtune.tune.trial"] for r in children} == {"1", "2", "3"}
    assert any("valid.accuracy" in r.data.metrics for r in children)


def test_a_holdout_share_of_train_joins_valid_for_the_trials_only_and_a_one_trial_budget_says_so(tmp_path: Path,
                                                                                                   tiny_model_dir: Path) -> None:
    from microtune import pipeline
    from microtune.data import read_split
    from microtune.pipeline.tune import selection_split

    recipe, ws = _recipe(tmp_path, tiny_model_dir, holdout=0.4), tmp_path / "ws"
    dataset = pipeline.check(recipe, workspace=ws).dataset_dir
    train, valid = read_split(dataset, "train"), read_split(dataset, "valid")
    folder, held, kept = selection_split(dataset, load_recipe(recipe), tmp_path / "sel")
    moved, rest = read_split(folder, "valid")[len(valid):], read_split(folder, "train")
    assert (held, kept) == (len(moved), len(rest)) == (6, 9) and read_split(folder, "valid")[:len(valid)] == valid
    key = lambda r: (r["text"], r["label"])  # noqa: E731
    assert sorted(map(key, moved + rest)) == sorted(map(key, train)) and not set(map(key, moved)) & set(map(key, rest))
    assert sorted(r["label"] for r in moved) == sorted(LABELS * 2)  # stratified: 2 of each label's 5
    assert not (folder / "test.jsonl").exists()
    again, _, _ = selection_split(dataset, load_recipe(recipe), tmp_path / "sel2")  # the same rows every time (resume, workers)
    assert read_split(again, "valid") == read_split(folder, "valid")

    (dataset / "test.jsonl").unlink()
    events = []
    result = pipeline.tune(recipe, workspace=ws, trials=3, budget_s=1, reporter=events.append)  # the first trial outlasts it
    summary = json.loads((result.folder / "summary.json").read_text())
    assert summary["holdout"] == 0.4 and summary["selection_rows"] == len(valid) + 6 and summary["counts"] == {"complete": 1}
    said = [e.data["text"] for e in events if e.stage == "tune" and e.kind == "message"]
    assert any("6 train rows held out" in text for text in said)
    assert any("can only return the recipe's own settings" in text for text in said), said  # the budget held one trial
    assert load_recipe(result.tuned_recipe).data.train == load_recipe(recipe).data.train  # the tuned recipe trains on all of train
    with pytest.raises(Exception, match="another recipe"):  # another share is another search: a new study
        pipeline.tune(recipe, ["tune.holdout=0.2"], workspace=ws, trials=2)


@pytest.mark.slow
def test_two_worker_processes_share_one_sqlite_study(tmp_path: Path, tiny_model_dir: Path) -> None:
    import optuna

    recipe, ws = _recipe(tmp_path, tiny_model_dir, pruner="none"), tmp_path / "ws"
    raw = yaml.safe_load(recipe.read_text())
    raw["train"]["lr"] = 0.002
    recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    cmd = [sys.executable, "-m", "microtune.cli", "tune", str(recipe), "--trials", "4", "--workers", "2", "--storage", storage,
           "--study", "shared", "-w", str(ws)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=600)
    assert done.returncode == 0, done.stderr
    trials = optuna.load_study(study_name="shared", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4  # exactly the trials asked for, by the two processes together
    assert len({t.user_attrs["microtune.owner"]["pid"] for t in trials}) <= 2
    assert trials[0].user_attrs["microtune.from_recipe"] and trials[0].params["train.lr"] == 0.002  # the recipe's own, first
    assert not any(t.user_attrs.get("microtune.from_recipe") for t in trials[1:])
    assert "best" in done.stdout and "0 (recipe)" in done.stdout and (tmp_path / "recipe.tuned.yaml").is_file()


@pytest.mark.slow
def test_a_running_trial_stops_at_the_budget_once_a_trial_has_completed(tmp_path: Path, tiny_model_dir: Path) -> None:
    """`--budget` bounds the search's wall time: the trial running when it runs out is stopped at its next step (PRUNED,
    stopped by the budget) instead of training to its end; a study with no completed trial would let it finish."""
    import optuna

    from microtune import pipeline

    recipe, ws = _recipe(tmp_path, tiny_model_dir, pruner="none"), tmp_path / "ws"
    raw = yaml.safe_load(recipe.read_text())
    raw["train"] |= {"max_steps": 100_000, "eval_steps": 100_000, "log_every": 1000}  # far longer than the budget
    recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
    (ws / "toy" / "tune").mkdir(parents=True)
    storage = f"sqlite:///{ws / 'toy' / 'tune' / 'study.db'}"
    study = optuna.create_study(storage=storage, study_name="toy", direction="maximize")
    study.add_trial(optuna.trial.create_trial(value=0.5, user_attrs={"microtune.from_recipe": True}))  # an earlier run's trial
    events = []
    result = pipeline.tune(recipe, workspace=ws, trials=5, budget_s=90, reporter=events.append)  # set-up included: room on a loaded machine
    trials = optuna.load_study(study_name="toy", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED"]  # stopped, and no trial started after the budget
    stopped = trials[1]
    assert stopped.user_attrs["microtune.stopped"] == "budget" and stopped.last_step is None  # no validation ran: not the pruner
    assert any(e.kind == "message" and "trial 1 stopped: the time budget was spent at step" in e.data["text"] for e in events)
    last = max(e.step for e in events if e.stage == "train" and e.kind == "progress")
    assert 0 < last < 100_000
    rows = list(csv.DictReader((result.folder / "trials.csv").open()))
    assert [r["stopped"] for r in rows] == ["", "budget"] and result.best_value == 0.5
