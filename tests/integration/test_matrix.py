"""The composition matrix: every task type × every fine-tuning method goes check → train → eval → register →
serve and answers through the official `openai` client — or is refused at `check` with its reason.

One workspace holds every cell's registered micro-model; one real `microtune serve` app (uvicorn on 127.0.0.1,
registry on) answers for all of them, so the test also proves that models of every method live side by side
under one memory budget. Tiny random models: the answers are nonsense, but they must be *valid* answers —
a label of the model's set, a label set, a JSON object with exactly the recipe's fields, free text.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from serve_helpers import Running
from toydata import LABELS, TEXTS, TINY_METHODS, write_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.exhaustive]  # CI's `make test-slow`

FIELDS = {"product": "what the message is about", "problem": "what went wrong"}
PRODUCTS = {"billing": "card", "shipping": "parcel", "refund": "mug"}


def _rows(task: str, indices: range) -> list[dict[str, Any]]:
    rows = []
    for i in indices:
        for label in LABELS:
            text = TEXTS[label][i]
            if task == "classify":
                rows.append({"text": text, "label": label})
            elif task == "multi_label":
                rows.append({"text": text, "label": [label] if i % 2 else sorted({label, "urgent"})})
            elif task == "chat":  # a multi-turn conversation: every assistant turn trained (loss_on: all)
                rows.append({"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": f"is it {label}?"},
                                          {"role": "user", "content": "yes"}, {"role": "assistant", "content": f"{label}: {text.split()[-1]}"}]})
            elif task == "extract":
                rows.append({"text": text, "target": {"product": PRODUCTS[label] if PRODUCTS[label] in text else None,
                                                      "problem": text.split()[-1]}})
            else:
                rows.append({"text": text, "target": f"{label}: {text.split()[-1]}"})
    return rows


TASKS: dict[str, dict[str, Any]] = {
    "classify": {"type": "classify", "instruction": "Name the support topic."},
    "multi_label": {"type": "classify", "instruction": "Name every topic of the message.", "multi_label": True, "max_labels": 2},
    "extract": {"type": "extract", "instruction": "Extract the product and the problem.", "fields": FIELDS, "max_new_tokens": 24},
    "generate": {"type": "generate", "instruction": "Summarise the message in a few words.", "max_new_tokens": 8},
    "chat": {"type": "chat", "instruction": "Help the customer in a few words.", "max_new_tokens": 8},
}

# (task, method) → what `check` says when the combination cannot be served (none today: every cell is served).
REFUSED: dict[tuple[str, str], str] = {}

CELLS = [(task, method) for task in TASKS for method in TINY_METHODS]


def _recipe(root: Path, task: str, method: str, base: Path) -> Path:
    folder = root / f"{task}-{method}"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", _rows(task, range(0, 5)))
    write_jsonl(folder / "test.jsonl", _rows(task, range(5, 7)))
    recipe = {"name": f"m-{task}-{method}".replace("_", "-"), "task": TASKS[task],
              "data": {"train": "train.jsonl", "test": "test.jsonl", "split": {"valid": 0.0}},
              "model": {"base": str(base)}, "method": TINY_METHODS[method],
              "train": {"max_steps": 2, "batch_size": 4, "max_seq_len": 96, "lr": 1e-3, "bf16": False},
              "eval": {"baselines": [], "batch_size": 8, "latency_examples": 1, "n_resamples": 100}}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Any]:
    """Run every cell through the pipeline into one workspace; ``outcome[cell]`` is the registered name or the refusal."""
    from microtune.core.errors import MicrotuneError
    from microtune.pipeline import check, run

    root = tmp_path_factory.mktemp("matrix")
    ws = root / "ws"
    outcome: dict[tuple[str, str], Any] = {}
    for task, method in CELLS:
        recipe = _recipe(root, task, method, tiny_model_dir)
        try:
            check(recipe, workspace=ws)
        except MicrotuneError as exc:
            outcome[(task, method)] = exc
            continue
        result = run(recipe, workspace=ws)
        outcome[(task, method)] = result
    return {"ws": ws, "outcome": outcome, "base": tiny_model_dir}


@pytest.fixture(scope="module")
def server(matrix: dict[str, Any]) -> Any:
    from microtune.serving import ServeSettings, build_app

    settings = ServeSettings(base=str(matrix["base"]), workspace=matrix["ws"], poll_s=0, timeout_s=300, max_loaded=4)
    with Running(build_app(settings, api_keys=[])) as running:
        yield running


def _client(server: Any) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.mark.parametrize(("task", "method"), CELLS, ids=[f"{t}-{m}" for t, m in CELLS])
def test_cell_is_served_or_refused_at_check(matrix: dict[str, Any], server: Any, task: str, method: str) -> None:
    outcome = matrix["outcome"][(task, method)]
    if (task, method) in REFUSED:
        assert isinstance(outcome, Exception), f"{task} × {method} was expected to be refused at check"
        assert REFUSED[(task, method)] in str(outcome)
        return
    assert not isinstance(outcome, Exception), f"{task} × {method} refused at check: {outcome}"
    assert outcome.model_version is not None, "the cell's micro-model was not registered"
    name = f"m-{task}-{method}".replace("_", "-")
    messages = [{"role": "user", "content": TEXTS["refund"][7]}]
    if task == "chat":  # a chat micro-model answers the whole conversation
        messages = [{"role": "system", "content": "Be brief."}, *messages, {"role": "assistant", "content": "is it refund?"},
                    {"role": "user", "content": "yes"}]
    answer = _client(server).chat.completions.create(model=name, messages=messages)
    content = answer.choices[0].message.content
    assert answer.choices[0].finish_reason in {"stop", "length"}
    if task == "classify":
        assert content in LABELS
    elif task == "multi_label":
        assert answer.model_extra["microtune"]["labels"], content
        assert set(answer.model_extra["microtune"]["labels"]) <= {*LABELS, "urgent"}
    elif task == "extract":
        assert set(json.loads(content)) == set(FIELDS)  # constrained decoding: valid JSON with exactly the fields
    else:
        assert isinstance(content, str)
        assert answer.model_extra["microtune"]["task"] == ("chat" if task == "chat" else "generate")
