"""The task protocol: every registered task type satisfies it, its metric list is the one source of the main metric,
its decoder spec says how answers are decoded; and a new task type is one class with its config plus one registration."""
from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import pytest
from pydantic import Field

from microtune import tasks
from microtune.config import task_metrics, validate_recipe
from microtune.core.errors import DataError, RecipeError
from microtune.synthesis.filters import STAGES
from microtune.tasks import (
    TASKS,
    ChatConfig,
    ClassifyConfig,
    DecoderSpec,
    ExtractConfig,
    GenerateConfig,
    SynthHooks,
    Task,
    TaskSection,
    get_task,
)
from microtune.tasks.base import check_text, example_rate, shot_turns, type_field
from toydata import write_jsonl

FIELDS = {"drug": "the drug", "effect": "the adverse effect"}
LABELS = ["billing", "refund", "shipping"]
DEFAULTED = {"atoms_of", "candidates", "main_metric"}  # protocol members with a shared implementation


def _protocol_methods() -> list[str]:
    """The protocol's methods (static, class and instance), not its data members or typing internals."""
    return [name for name, value in vars(Task).items()
            if not name.startswith("_") and (isinstance(value, (staticmethod, classmethod)) or inspect.isfunction(value))]


def _check_conformance(cls: type, task: Any, name: str) -> None:
    assert isinstance(task, Task) and type(task) is cls
    assert cls.name == name and isinstance(cls.has_labels, bool)
    assert issubclass(cls.config, TaskSection) and cls.config.model_fields["type"].default == name
    for member in _protocol_methods():
        ours, theirs = inspect.signature(getattr(cls, member)), inspect.signature(getattr(Task, member))
        assert list(ours.parameters) == list(theirs.parameters), f"{name}.{member}{ours} differs from Task.{member}{theirs}"
        if member not in DEFAULTED:  # the protocol's body is `...`: the class must give its own
            owner = next(k for k in cls.__mro__ if member in vars(k))
            assert owner is not Task, f"{name} does not implement {member}"


# one config per behaviour that changes the metric list or the decoder
CASES: list[tuple[TaskSection, str, list[str]]] = [
    (ClassifyConfig(instruction="Route it."), "accuracy", ["accuracy", "macro_f1"]),
    (ClassifyConfig(instruction="Route it.", multi_label=True), "exact_match", ["exact_match", "micro_f1", "macro_f1"]),
    (ClassifyConfig(instruction="Route it.", none_label="refund"), "accuracy", ["accuracy", "macro_f1", "in_scope_accuracy", "oos_recall"]),
    (ExtractConfig(instruction="Extract it.", fields=FIELDS), "micro_f1", ["micro_f1", "micro_f1_normalized", "valid_rate"]),
    (GenerateConfig(instruction="Sum it up."), "rouge_l", ["rouge_l", "length_ratio"]),
    (ChatConfig(instruction="Help the customer."), "rouge_l", ["rouge_l", "length_ratio"]),
]
GOLD_PRED: dict[str, tuple[list[Any], list[Any]]] = {  # two examples per task type, one answer right, one not
    "classify": (["billing", "refund"], ["billing", "shipping"]),
    "extract": ([{"drug": "aspirin", "effect": "rash"}, {"drug": "insulin", "effect": None}], [{"drug": "aspirin", "effect": None}, None]),
    "generate": ([["we prove a bound"], ["a new model"]], ["we prove a bound", None]),
    "chat": ([["your card is unblocked"], ["which card?"]], ["your card is unblocked", None]),
}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_registered_task_class_implements_the_protocol(name: str) -> None:
    cls = TASKS[name]
    cfg = next(c for c, _, _ in CASES if c.type == name)
    task = get_task(cfg, LABELS)
    assert task.cfg is cfg and task.labels == LABELS
    _check_conformance(cls, task, name)
    assert {"normalize", "decoder", "metric_names", "synth", "example_scores"} <= set(_protocol_methods())


@pytest.mark.parametrize(("cfg", "main", "names"), CASES, ids=lambda v: getattr(v, "type", None) if isinstance(v, TaskSection) else None)
def test_the_main_metric_is_the_first_of_the_task_class_metric_list(cfg: TaskSection, main: str, names: list[str]) -> None:
    cls = TASKS[cfg.type]
    assert cls.metric_names(cfg) == names and cls.main_metric(cfg) == main == names[0]
    every = cls.metric_names(cfg, every=True)
    assert set(names) <= set(every) and every[0] == main
    assert task_metrics(cfg) == names and task_metrics(cfg, every=True) == every  # config reads the same source
    recipe = validate_recipe({"name": "x", "data": {"train": "t.jsonl"}, "task": cfg.model_dump()})
    assert recipe.metric_names()[0] == main
    golds, preds = GOLD_PRED[cfg.type]
    reported = get_task(cfg, LABELS).metrics(golds, preds)
    assert set(every) <= set(reported), f"{cfg.type} lists metrics it does not report: {set(every) - set(reported)}"


def test_the_decoder_spec_of_each_task() -> None:
    single = get_task(ClassifyConfig(instruction="x"), LABELS).decoder()
    assert single == DecoderSpec(kind="labels", candidates=LABELS)
    multi = get_task(ClassifyConfig(instruction="x", multi_label=True, max_labels=2), LABELS).decoder()
    assert multi.kind == "labels" and multi.candidates == [*LABELS, "billing; refund", "billing; shipping", "refund; shipping"]
    extract = get_task(ExtractConfig(instruction="x", fields=FIELDS, max_new_tokens=40)).decoder()
    assert extract.kind == "json" and extract.max_new_tokens == 40
    assert extract.schema is not None and extract.schema["required"] == ["drug", "effect"] and not extract.schema["additionalProperties"]
    assert extract.schema["properties"]["drug"]["description"] == "the drug"
    generate = get_task(GenerateConfig(instruction="x", max_new_tokens=60)).decoder()
    assert generate == DecoderSpec(kind="free", max_new_tokens=60)
    # existing callers of candidates(): the closed answer set, or None when text is generated
    assert get_task(ClassifyConfig(instruction="x"), LABELS).candidates() == LABELS
    assert get_task(ExtractConfig(instruction="x", fields=FIELDS)).candidates() is None
    assert get_task(GenerateConfig(instruction="x")).candidates() is None


def test_a_decoder_spec_needs_what_its_kind_decodes_with() -> None:
    with pytest.raises(ValueError, match="candidate answers"):
        DecoderSpec(kind="labels")
    with pytest.raises(ValueError, match="JSON schema"):
        DecoderSpec(kind="json", max_new_tokens=8)
    with pytest.raises(ValueError, match="max_new_tokens"):
        DecoderSpec(kind="free")


def test_every_built_in_task_has_synth_hooks_and_they_name_known_filters() -> None:
    hooks = get_task(ClassifyConfig(instruction="Route it."), LABELS).synth()
    assert isinstance(hooks, SynthHooks) and set(hooks.filters) <= set(STAGES) and "probe" in hooks.filters
    assert hooks.answer_row({"text": "my bill", "label": "billing", "source": "t:1"}) == {"text": "my bill", "label": "billing"}
    assert hooks.stratum is None  # classify plans by label
    extract = get_task(ExtractConfig(instruction="x", fields=FIELDS)).synth()
    assert extract is not None and set(extract.filters) <= set(STAGES) and "grounding" in extract.filters and "probe" not in extract.filters
    assert extract.stratum is not None and extract.stratum({"text": "t", "output": {"drug": "x", "effect": None}}) == "drug"
    generate = get_task(GenerateConfig(instruction="x")).synth()
    assert generate is not None and {"target_length", "target_copy"} <= set(generate.filters) <= set(STAGES)


def test_each_task_section_has_only_its_own_keys() -> None:
    assert {"labels", "multi_label", "none_label"} <= set(ClassifyConfig.model_fields)
    assert not {"target_field", "fields", "max_new_tokens"} & set(ClassifyConfig.model_fields)
    assert not {"labels", "label_field", "multi_label", "none_label"} & (set(ExtractConfig.model_fields) | set(GenerateConfig.model_fields))
    assert "fields" not in GenerateConfig.model_fields
    recipe = validate_recipe({"name": "x", "data": {"train": "t.jsonl"}, "task": {"instruction": "go"}})  # no type: classify
    assert isinstance(recipe.task, ClassifyConfig)


def test_an_unknown_task_key_or_type_names_the_fix(tmp_path: Path) -> None:
    from microtune.config import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("name: x\ntask:\n  type: extract\n  instruction: go\n  fields: {drug: the drug}\n  labels: [a, b]\n"
                    "  max_new_token: 5\ndata: {train: t.jsonl}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    text = str(err.value)
    assert f"{path}:6 task.labels: key 'labels' is not valid for task.type extract; it applies to task.type classify" in text
    assert f"{path}:7 task.max_new_token: unknown key 'max_new_token'; did you mean 'max_new_tokens'? (task.type extract)" in text
    path.write_text("name: x\ntask:\n  instruction: go\n  type: clasify\ndata: {train: t.jsonl}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert f"{path}:4 task.type: unknown task type 'clasify'; did you mean 'classify'? (one of: classify, extract, generate, chat)" in str(err.value)


def test_an_old_artifact_recipe_with_keys_of_the_flat_task_section_still_loads(tmp_path: Path) -> None:
    """recipe.json files written before the task union carry every task key; those a task type does not have are dropped."""
    from microtune.config import artifact_recipe

    old_task = {"type": "classify", "instruction": "Route it.", "labels": None, "text_field": "text", "label_field": "label",
                "multi_label": False, "max_labels": 2, "label_separator": ";", "none_label": None, "target_field": "target",
                "fields": None, "max_new_tokens": 96}
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({"name": "x", "task": old_task, "data": {"train": "t.jsonl"}}))
    assert artifact_recipe(path).task == ClassifyConfig(instruction="Route it.")
    path.write_text(json.dumps({"name": "x", "task": {**old_task, "type": "generate", "max_new_tokens": 60}, "data": {"train": "t.jsonl"}}))
    assert artifact_recipe(path).task == GenerateConfig(instruction="Route it.", max_new_tokens=60)


# -- the extension point: a task type defined here, registered with one line --------------------------
class PolarityConfig(TaskSection):
    type: Literal["polarity"] = type_field("polarity")
    polarity_field: str = Field("polarity", description="Field that holds `positive` or `negative`.")


class PolarityTask(Task):
    """Text → positive or negative: a label task written against the protocol only."""

    name: ClassVar[str] = "polarity"
    config: ClassVar[type[TaskSection]] = PolarityConfig
    has_labels: ClassVar[bool] = True

    def __init__(self, cfg: PolarityConfig, labels: Sequence[str] = ()):
        self.cfg, self.labels = cfg, list(labels)

    @staticmethod
    def normalize(row: dict[str, Any], cfg: PolarityConfig) -> tuple[dict[str, Any] | None, list[tuple[str, Any]]]:
        text, problems = check_text(row, cfg.text_field)
        value = row.get(cfg.polarity_field)
        if value not in ("positive", "negative"):
            problems.append((f"field {cfg.polarity_field!r} must be positive or negative", value))
        return (None, problems) if problems else ({"text": text, "label": value}, [])

    @staticmethod
    def label_of(example: dict[str, Any]) -> str:
        return example["label"]

    def messages(self, example: dict[str, Any], *, label_list: bool = False, shots: Sequence[dict[str, Any]] = ()) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.cfg.instruction}, *shot_turns(shots, self.target), {"role": "user", "content": example["text"]}]

    def target(self, example: dict[str, Any]) -> str:
        return example["label"]

    def decoder(self) -> DecoderSpec:
        return DecoderSpec(kind="labels", candidates=["negative", "positive"])

    def gold(self, example: dict[str, Any]) -> str:
        return example["label"]

    def parse(self, output: str) -> str | None:
        return output.strip() if output.strip() in ("negative", "positive") else None

    def metrics(self, golds: Sequence[Any], preds: Sequence[Any]) -> dict[str, Any]:
        return {"agreement": example_rate(g == p for g, p in zip(golds, preds)), "valid_rate": example_rate(p is not None for p in preds)}

    def example_scores(self, golds: Sequence[Any], preds: Sequence[Any]) -> list[float]:
        return [float(g == p) for g, p in zip(golds, preds)]

    @classmethod
    def metric_names(cls, cfg: PolarityConfig, every: bool = False) -> list[str]:
        return ["agreement"] + (["valid_rate"] if every else [])

    def synth(self) -> None:
        return None


@pytest.fixture
def polarity() -> Any:
    tasks.register(PolarityTask)  # the one line a new task type needs
    yield PolarityTask
    tasks.unregister("polarity")


def test_a_new_task_type_validates_and_goes_through_check(polarity: Any, tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    from microtune import pipeline

    _check_conformance(PolarityTask, PolarityTask(PolarityConfig(instruction="x")), "polarity")
    rows = [{"text": f"{w} service, {i} stars", "mood": "positive" if w == "great" else "negative"}
            for i in range(4) for w in ("great", "awful")]
    train = write_jsonl(tmp_path / "moods.jsonl", rows)
    task = {"type": "polarity", "labels": None, "instruction": "Is this review positive or negative?", "polarity_field": "mood"}
    recipe_path = make_recipe(tiny_model_dir, data={"train": train.name, "split": {"valid": 0.0, "test": 0.25}}, task=task)
    checked = pipeline.check(recipe_path, workspace=tmp_path / "ws")
    assert isinstance(checked.recipe.task, PolarityConfig) and checked.recipe.metric_names() == ["agreement"]
    assert checked.manifest["labels"] == ["negative", "positive"] and checked.manifest["task"]["polarity_field"] == "mood"
    assert checked.manifest["stats"]["rows"] == {"train": 6, "valid": 0, "test": 2}
    stored = [json.loads(line) for line in (checked.dataset_dir / "train.jsonl").read_text().splitlines()]
    assert {r["label"] for r in stored} == {"negative", "positive"} and all(r["text"].endswith("stars") for r in stored)

    write_jsonl(train, [*rows, {"text": "meh", "mood": "neutral"}])  # the task's own row check, reported at file:line
    with pytest.raises(DataError) as err:
        pipeline.check(recipe_path, workspace=tmp_path / "ws")
    assert str(err.value.problems[0]).startswith(f"{train}:9: field 'mood' must be positive or negative (got 'neutral')")

    section = {k: v for k, v in task.items() if v is not None}
    with pytest.raises(RecipeError, match=r"eval.metrics: 'accuracy' not reported for this task \(one of: agreement, valid_rate\)"):
        validate_recipe({"name": "x", "data": {"train": "t.jsonl"}, "task": section, "eval": {"metrics": ["accuracy"]}})
    with pytest.raises(RecipeError, match="key 'labels' is not valid for task.type polarity; it applies to task.type classify"):
        validate_recipe({"name": "x", "data": {"train": "t.jsonl"}, "task": section | {"labels": ["a", "b"]}})


def test_an_unregistered_task_type_is_unknown_again(polarity: Any) -> None:
    raw = {"name": "x", "data": {"train": "t.jsonl"}, "task": {"type": "polarity", "instruction": "go"}}
    assert isinstance(validate_recipe(raw).task, PolarityConfig)
    tasks.unregister("polarity")
    with pytest.raises(RecipeError, match="unknown task type 'polarity'"):
        validate_recipe(raw)
    tasks.register(PolarityTask)  # the fixture removes it again
