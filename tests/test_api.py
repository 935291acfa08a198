"""The public API: every step and registry verb is a function on `import microtune` (lazy, torch-free, never shadowed
by a module), recipes vary in code through `Recipe.with_overrides`, and the train step routes the engine's events."""
from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import microtune
from microtune.config import load_recipe
from microtune.core.errors import ArtifactError, InputError, RecipeError
from microtune.core.progress import Event

SRC = Path(__file__).resolve().parents[1] / "src"
STEPS = ("check", "synth", "train", "evaluate", "register", "run", "report", "export", "serve", "watch", "predict")
VERBS = ("list_models", "list_versions", "show_version", "promote", "rollback")


def test_import_microtune_is_lazy_and_torch_free() -> None:
    code = ("import sys, microtune; heavy = [m for m in ('torch', 'transformers', 'mlflow', 'microtune.pipeline') if m in sys.modules]; "
            "print(heavy, sorted(microtune.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"PYTHONPATH": str(SRC)})
    heavy, names = out.stdout.strip().split("] ", 1)
    assert heavy == "[" and all(repr(n) in names for n in (*STEPS, *VERBS))


def test_every_public_name_stays_a_function_after_importing_every_module() -> None:
    """Before the stage packages were renamed, `import microtune.train` made `microtune.train(...)` a module."""
    for info in pkgutil.walk_packages(microtune.__path__, "microtune."):
        importlib.import_module(info.name)
    from microtune import pipeline

    assert set(microtune.__all__) == {"__version__", *STEPS, *VERBS}
    for name in (*STEPS, *VERBS):
        fn = getattr(microtune, name)
        assert inspect.isfunction(fn) and fn is getattr(pipeline, name) and name in dir(microtune), name
    for name in pipeline.__all__:
        assert not inspect.ismodule(getattr(pipeline, name)), name
    with pytest.raises(AttributeError, match="no attribute 'trian'"):
        microtune.trian  # noqa: B018


def test_each_public_function_runs_and_answers_bad_input_with_its_fix(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    for name in ("check", "synth", "train", "evaluate", "run", "watch"):
        with pytest.raises(RecipeError, match="recipe not found"):
            getattr(microtune, name)(missing)
    with pytest.raises(RecipeError, match="recipe not found"):
        microtune.register(missing, tmp_path, tmp_path)
    with pytest.raises(ArtifactError):
        microtune.report(tmp_path)
    with pytest.raises(InputError, match="--merge OUT, --vllm OUT and/or --gguf OUT.gguf"):
        microtune.export(tmp_path)
    with pytest.raises(InputError, match="bad serve settings") as bad:
        microtune.serve(port=70000, api_keys=["secret-key"])
    assert "port" in str(bad.value) and "secret-key" not in str(bad.value)
    with pytest.raises(InputError, match="bad serve settings"):
        microtune.serve(no_such_setting=1)


def test_registry_verbs_on_an_empty_store(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    assert microtune.list_models(ws) == []
    for call in (lambda: microtune.list_versions("toy", ws), lambda: microtune.show_version("toy", workspace=ws),
                 lambda: microtune.promote("toy", 1, workspace=ws), lambda: microtune.rollback("toy", ws)):
        with pytest.raises(InputError, match="no registered model named 'toy'"):
            call()


def test_with_overrides_returns_a_validated_copy(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    recipe = load_recipe(make_recipe(tiny_model_dir))
    changed = recipe.with_overrides(["train.epochs=1", "eval.baselines=[]"])
    assert (changed.train.epochs, changed.eval.baselines) == (1, [])
    assert (recipe.train.epochs, recipe.eval.baselines) == (2, ["zero_shot", "few_shot"])  # the original is untouched
    assert changed.data.train == recipe.data.train and changed.data.train.is_absolute()
    assert recipe.with_overrides([]) is recipe
    with pytest.raises(RecipeError, match="unknown key 'epochz'; did you mean 'epochs'"):
        recipe.with_overrides(["train.epochz=1"])
    with pytest.raises(RecipeError, match="a.b=value"):
        recipe.with_overrides(["train.epochs"])
    with pytest.raises(RecipeError, match=r"got the string 'train.epochs=1'") as one:
        recipe.with_overrides("train.epochs=1")  # type: ignore[arg-type]
    assert "with_overrides(['train.epochs=1'])" in (one.value.hint or "")


def test_train_reports_progress_to_the_caller_and_metrics_to_mlflow(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    from mlflow import MlflowClient

    from microtune.core.artifacts import read_manifest

    events: list[Event] = []
    adapter = microtune.train(make_recipe(tiny_model_dir, train={"max_steps": 3, "log_every": 1}), workspace=tmp_path / "ws",
                              reporter=events.append)
    kinds = [(e.stage, e.kind, e.step, e.total) for e in events]
    assert kinds == [("train", "start", 0, 3), ("train", "progress", 1, 3), ("train", "progress", 2, 3),
                     ("train", "progress", 3, 3), ("train", "done", 3, 3)]
    assert all(e.data["loss"] > 0 and e.data["tokens_per_s"] > 0 for e in events if e.kind == "progress")
    run_id = read_manifest(adapter, "adapter")["mlflow_run_id"]
    history = MlflowClient(f"sqlite:///{tmp_path / 'ws' / 'mlflow.db'}").get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3]  # the metrics events went to MLflow, not to the caller


def test_serve_checks_its_settings_builds_the_app_and_says_where(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    step = importlib.import_module("microtune.pipeline.serve")  # `microtune.pipeline.serve` itself is the function
    seen: dict = {}
    monkeypatch.setattr(step, "build_app", lambda settings, keys: seen.update(settings=settings, keys=keys) or "the app")
    monkeypatch.setattr(step, "run_app", lambda app, settings: seen.update(app=app))
    monkeypatch.setenv("MICROTUNE_API_KEYS", "k0")
    key_file = tmp_path / "keys.txt"
    key_file.write_text("k1\n# a comment\n")
    events: list[Event] = []
    microtune.serve({"intents": tmp_path}, api_key_file=key_file, reporter=events.append, port=0, max_batch=4)
    assert seen["app"] == "the app" and seen["keys"] == ["k0", "k1"]
    assert seen["settings"].adapters == {"intents": tmp_path} and seen["settings"].max_batch == 4
    assert [(e.stage, e.kind, e.data["text"]) for e in events] == [
        ("serve", "message", "serving on http://127.0.0.1:0/v1 with 2 API key(s); models: GET /v1/models")]
