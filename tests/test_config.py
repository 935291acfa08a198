"""Recipe loading: defaults, overrides, and errors that name the path, the line and the nearest key."""
from __future__ import annotations

from pathlib import Path

import pytest

from microtune.config import apply_override, load_recipe
from microtune.core.errors import RecipeError

ROOT = Path(__file__).resolve().parents[1]


def test_demo_recipe_loads_with_resolved_paths() -> None:
    recipe = load_recipe(ROOT / "recipes/banking-intents.yaml")
    assert recipe.name == "banking-intents"
    assert recipe.data.train == ROOT / "recipes/data/clinc150-banking/train.jsonl"
    assert recipe.data.train.is_file()
    assert recipe.method.target_modules == "all-linear"


def test_overrides_parse_values_as_yaml() -> None:
    recipe = load_recipe(ROOT / "recipes/banking-intents.yaml",
                         ["train.epochs=1", "train.bf16=off", "method.target_modules=[q_proj, v_proj]", "eval.max_examples=5"])
    assert recipe.train.epochs == 1
    assert recipe.train.bf16 is False
    assert recipe.method.target_modules == ["q_proj", "v_proj"]
    assert recipe.eval.max_examples == 5


def test_switching_the_method_kind_keeps_the_settings_the_new_kind_has(caplog: pytest.LogCaptureFixture) -> None:
    """`--set method.kind=X` on a recipe written for another method (and watch's `method.kind=qlora` retrain on a
    prompt-tuning or IA3 recipe) validates: settings X has are kept, the others dropped with a warning."""
    banking = ROOT / "recipes/banking-intents.yaml"
    qlora = load_recipe(banking, ["method.kind=qlora"])
    assert (qlora.method.kind, qlora.method.r, qlora.method.alpha) == ("qlora", 16, 32)
    with caplog.at_level("WARNING", logger="microtune.config"):
        ia3 = load_recipe(banking, ["method.kind=ia3"])
    assert ia3.method.kind == "ia3"
    assert "method.kind=ia3: method.r=16 dropped (a lora setting that ia3 does not have)" in caplog.text
    for kind in ("prompt_tuning", "prefix_tuning", "ia3", "full", "dora", "lora"):
        recipe = load_recipe(banking, [f"method.kind={kind}"])
        back = recipe.with_overrides(recipe.watch.retrain)  # watch's default retrain: method.kind=qlora
        assert back.method.kind == "qlora" and back.name == recipe.name
    prompt = load_recipe(banking, ["method.kind=prompt_tuning", "method.num_virtual_tokens=12"])
    assert prompt.method.num_virtual_tokens == 12
    with pytest.raises(RecipeError, match="method.r: unknown key 'r'"):  # set after the switch: the new kind has no r
        load_recipe(banking, ["method.kind=ia3", "method.r=4"])
    with pytest.raises(RecipeError, match="unknown kind 'lorra'"):
        load_recipe(banking, ["method.kind=lorra"])


def test_bad_override_form() -> None:
    with pytest.raises(RecipeError, match="not of the form a.b=value"):
        apply_override({}, "train.epochs")


def test_every_problem_reported_with_line_and_nearest_key(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(
        "name: ok\n"
        "task:\n"
        "  instruction: classify\n"
        "data:\n"
        "  train: t.jsonl\n"
        "train:\n"
        "  epochz: 2\n"
        "  lr: fast\n"
        "methd:\n"
        "  r: 8\n"
    )
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    text = str(info.value)
    assert "3 problem(s)" in text
    assert f"{path}:7 train.epochz: unknown key 'epochz'; did you mean 'epochs'?" in text
    assert f"{path}:8 train.lr: Input should be a valid number" in text and "(got 'fast')" in text
    assert f"{path}:9 methd: unknown key 'methd'; did you mean 'method'?" in text
    assert info.value.exit_code == 2


def test_missing_recipe_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)


def test_duplicate_labels_rejected(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("name: x\ntask: {instruction: go, labels: [a, b, a]}\ndata: {train: t.jsonl}\n")
    with pytest.raises(RecipeError, match="labels repeat"):
        load_recipe(path)


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_bundled_recipe_and_its_data_check_clean(path: Path) -> None:
    from microtune.data import build_dataset

    result = build_dataset(load_recipe(path))
    assert not result.log.errors
    assert all(result.splits[s] for s in ("train", "valid", "test"))
    assert (path.parent / "data").is_dir()


def test_faa_recipe_warns_about_its_majority_cause() -> None:
    from microtune.data import build_dataset

    warnings = [str(p) for p in build_dataset(load_recipe(ROOT / "recipes/faa-maintenance.yaml")).log.warnings]
    assert any("'inadequate preflight inspection' is 71% of train" in w for w in warnings), warnings


def test_an_artifact_recipe_with_a_retired_key_still_loads(tmp_path) -> None:
    """Adapters written by an older microtune keep loading after a recipe key is retired; other problems still fail."""
    import json

    import pytest

    from microtune.config import artifact_recipe
    from microtune.core.errors import RecipeError

    raw = {"name": "x", "task": {"instruction": "Route it."}, "data": {"train": "t.jsonl"},
           "watch": {"min_new_rows": 7, "quality_floor": None}, "train": {"epochs": 2, "retired_knob": 1}}
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(raw))
    recipe = artifact_recipe(path)
    assert recipe.watch.min_new_rows == 7 and recipe.train.epochs == 2
    path.write_text(json.dumps({**raw, "train": {"epochs": "many"}}))
    with pytest.raises(RecipeError, match="problem"):
        artifact_recipe(path)
