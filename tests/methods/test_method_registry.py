"""The method registry: capability flags agree with what the code does, recipe rules come from them, and a
method added later (one module + one `register` call) validates, obeys its flags and trains."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import Field

from microtune import methods
from microtune.config import artifact_recipe, load_recipe, recipe_schema
from microtune.core.errors import RecipeError
from microtune.core.schema import Section
from microtune.methods import Capabilities, MethodContext, MethodSpec

ALL_OFF = dict.fromkeys(Capabilities.names(), False)


class LoraTinyConfig(Section):
    """A throw-away LoRA variant: rank 2 on the attention projections only."""

    kind: Literal["lora_tiny"] = Field("lora_tiny", description="Tiny LoRA (test method).")
    r: int = Field(2, ge=1, le=8, description="Rank.")
    targets: list[str] = Field(["q_proj", "v_proj"], description="Modules to adapt.")


def _build_tiny(method: LoraTinyConfig, ctx: MethodContext) -> Any:
    from peft import LoraConfig, TaskType

    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=method.r, lora_alpha=2 * method.r, target_modules=method.targets)


TINY = MethodSpec(kind="lora_tiny", config=LoraTinyConfig, build=_build_tiny,
                  capabilities=Capabilities(**{**ALL_OFF, "mergeable": True, "vllm_servable": True}),
                  reasons={"packing": "the test says so", "fsdp": "the test says so too"})


@pytest.fixture
def lora_tiny():
    methods.register(TINY)  # the one line that adds a method
    try:
        yield TINY
    finally:
        methods.unregister("lora_tiny")


def _problems(path: Path, sets: list[str] | None = None) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, sets)
    return [str(p) for p in info.value.problems]


def test_builtin_flags_agree_with_peft_and_the_exporters() -> None:
    """prompt_learning is what PEFT says of the built config; vllm_servable is what `export --vllm` accepts."""
    from microtune.models.export import check_vllm_lora

    assert methods.kinds() == ["lora", "dora", "qlora", "ia3", "prompt_tuning", "prefix_tuning", "full"]
    for spec in methods.specs():
        if spec.capabilities.full_model:
            assert spec.build is None and not spec.capabilities.vllm_servable and not spec.capabilities.mixed_batch
            continue
        peft_config = spec.build(spec.config(), MethodContext(seed=0))
        assert peft_config.is_prompt_learning == spec.capabilities.prompt_learning, spec.kind
        assert spec.capabilities.mergeable == (not peft_config.is_prompt_learning), spec.kind  # export --merge's rule
        try:
            check_vllm_lora(Path("adapter"), peft_config)
            servable = True
        except Exception:
            servable = False
        assert servable == spec.capabilities.vllm_servable, spec.kind
    assert methods.kinds_with("quantized_base") == ["qlora"] and methods.spec("qlora").quantize is not None
    assert methods.kinds_with("prompt_learning") == ["prompt_tuning", "prefix_tuning"]
    assert methods.kinds_with("fsdp") == ["lora", "dora", "ia3", "full"]
    assert methods.kinds_with("packing") == ["lora", "dora", "qlora", "ia3", "full"]


def test_server_serves_what_the_mixed_batch_flag_says(tmp_path) -> None:
    """The flag decides which adapters join mixed batches (qlora too: a LoRA adapter on the full-precision base);
    every other method is served too, on the shared base alone (DoRA) or as a model instance of its own."""
    from microtune.serving.catalog import ALONE, MIXED, OWN, placement

    assert methods.kinds_with("mixed_batch") == ["lora", "qlora"]
    peft_types = {"lora": "LORA", "qlora": "LORA", "dora": "LORA", "ia3": "IA3", "prompt_tuning": "PROMPT_TUNING",
                  "prefix_tuning": "PREFIX_TUNING", "full": None}  # what each method's artifact holds (full: no adapter config)
    places = {}
    for kind, peft_type in peft_types.items():
        folder = tmp_path / kind
        folder.mkdir()
        if peft_type:
            (folder / "adapter_config.json").write_text(f'{{"peft_type": "{peft_type}"}}')
        places[kind] = placement(kind, folder)
    assert places == {"lora": MIXED, "qlora": MIXED, "dora": ALONE, "ia3": OWN, "prompt_tuning": OWN, "prefix_tuning": OWN, "full": OWN}
    assert placement("qlora", tmp_path / "qlora", qlora_base="4bit") == OWN


def test_a_spec_whose_flags_contradict_its_hooks_is_refused() -> None:
    with pytest.raises(ValueError, match="full_model methods have no builder"):
        MethodSpec(kind="lora_tiny", config=LoraTinyConfig, build=None, capabilities=Capabilities(**ALL_OFF))
    with pytest.raises(ValueError, match="quantized_base methods need `quantize`"):
        MethodSpec(kind="lora_tiny", config=LoraTinyConfig, build=_build_tiny,
                   capabilities=Capabilities(**{**ALL_OFF, "quantized_base": True}))
    with pytest.raises(ValueError, match="`kind` field defaulting to 'other'"):
        MethodSpec(kind="other", config=LoraTinyConfig, build=_build_tiny, capabilities=Capabilities(**ALL_OFF))
    with pytest.raises(ValueError, match="already registered"):
        methods.register(methods.spec("lora"))
    with pytest.raises(RecipeError, match="unknown method kind 'lorra'; did you mean 'lora'"):
        methods.spec("lorra")


def test_every_rule_is_reported_at_once_with_its_yaml_path(make_recipe, tiny_model_dir: Path) -> None:
    """prompt tuning + packing + fsdp + save_steps, and an unrelated bad field: four problems, one pass."""
    path = make_recipe(tiny_model_dir, method={"kind": "prompt_tuning"}, eval={"shots": 0},
                       train={"packing": True, "save_steps": 5, "distributed": {"strategy": "fsdp"}})
    lines = path.read_text().splitlines()
    problems = _problems(path)
    assert len(problems) == 4, problems
    packing, strategy, save_steps, shots = (next(p for p in problems if f" {key}: " in p) for key in
                                            ("train.packing", "train.distributed.strategy", "train.save_steps", "eval.shots"))
    assert f"recipe.yaml:{next(i for i, x in enumerate(lines, 1) if 'packing:' in x)} train.packing:" in packing
    assert "cannot be used with method.kind=prompt_tuning" in packing and "use method.kind=lora, dora, qlora, ia3 or full" in packing
    assert "does not support method.kind=prompt_tuning" in strategy and "use method.kind=lora, dora, ia3 or full with fsdp" in strategy
    assert "not supported with train.distributed.strategy=fsdp" in save_steps and "(got 5)" in save_steps
    assert "greater than or equal to 1" in shots


def test_rules_follow_each_methods_flags(make_recipe, tiny_model_dir: Path) -> None:
    """qlora packs but cannot shard; full does both; the rules come from the flags, not from kind lists."""
    path = make_recipe(tiny_model_dir, train={"packing": True, "distributed": {"strategy": "fsdp"}})
    problems = _problems(path, ["method.kind=qlora"])
    assert len(problems) == 1 and "train.distributed.strategy: " in problems[0] and "cannot shard qlora's 4-bit" in problems[0]
    assert load_recipe(path, ["method.kind=full"]).method.kind == "full"


def test_check_reports_the_rules_with_the_rest(make_recipe, tiny_model_dir: Path) -> None:
    from typer.testing import CliRunner

    from microtune.cli import app

    path = make_recipe(tiny_model_dir, method={"kind": "qlora"}, train={"packing": True, "distributed": {"strategy": "fsdp"}},
                       eval={"shots": 0})
    result = CliRunner().invoke(app, ["check", str(path), "--set", "method.kind=prefix_tuning"])
    assert result.exit_code == 2
    for key in ("train.packing", "train.distributed.strategy", "eval.shots"):
        assert key in result.output


def test_a_method_registered_later_validates_obeys_its_flags_and_trains(lora_tiny, tmp_path: Path, make_recipe,
                                                                       tiny_model_dir: Path) -> None:
    from microtune import pipeline

    path = make_recipe(tiny_model_dir, method={"kind": "lora_tiny", "r": 3}, train={"max_steps": 2})
    recipe = load_recipe(path)
    assert isinstance(recipe.method, LoraTinyConfig) and recipe.method.r == 3
    assert "LoraTinyConfig" in recipe_schema()["$defs"]
    assert any("method.tragets: unknown key 'tragets'; did you mean 'targets'?" in p for p in _problems(path, ["method.tragets=[q_proj]"]))
    packing = _problems(path, ["train.packing=true"])
    assert len(packing) == 1 and "train.packing cannot be used with method.kind=lora_tiny: the test says so" in packing[0]
    assert "use method.kind=lora, dora, qlora, ia3 or full with packing" in packing[0]
    assert any("does not support method.kind=lora_tiny" in p for p in _problems(path, ["train.distributed.strategy=fsdp"]))

    adapter = pipeline.train(path, workspace=tmp_path / "ws")
    manifest = json.loads((adapter / "manifest.json").read_text())
    assert manifest["method"] == "lora_tiny" and manifest["final"]["steps"] == 2
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 3 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert artifact_recipe(adapter / "recipe.json").method == recipe.method  # eval and serve reload it


def test_an_unregistered_method_is_an_unknown_kind_again(lora_tiny, make_recipe, tiny_model_dir: Path) -> None:
    path = make_recipe(tiny_model_dir, method={"kind": "lora_tiny"})
    assert load_recipe(path).method.kind == "lora_tiny"
    methods.unregister("lora_tiny")
    try:
        assert any("unknown kind 'lora_tiny'" in p for p in _problems(path))
        assert "LoraTinyConfig" not in recipe_schema()["$defs"]
    finally:
        methods.register(TINY)  # the fixture unregisters it
