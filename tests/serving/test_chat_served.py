"""A chat micro-model end to end: check → train (loss on every assistant turn) → eval with both prompted baselines →
`serve`, which passes the whole `messages` list (system message and earlier turns) and answers what eval answered."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from serve_helpers import Running, call
from toydata import LABELS, TEXTS, write_jsonl

INSTRUCTION = "Help the customer in a few words."
REPLIES = {"billing": "let me check the charge", "shipping": "let me track the parcel", "refund": "i will start the refund"}


def _conversation(label: str, i: int) -> dict[str, Any]:
    system = [{"role": "system", "content": "You are the support desk."}] if i % 2 else []
    return {"messages": [*system, {"role": "user", "content": TEXTS[label][i]}, {"role": "assistant", "content": f"is this about {label}?"},
                         {"role": "user", "content": f"yes, {label} number {i}"}, {"role": "assistant", "content": REPLIES[label]}]}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Any]:
    import yaml

    from microtune import pipeline

    root = tmp_path_factory.mktemp("chat-served")
    write_jsonl(root / "train.jsonl", [_conversation(label, i) for i in range(5) for label in LABELS])
    test = write_jsonl(root / "test.jsonl", [_conversation(label, i) for i in range(5, 7) for label in LABELS])
    recipe = {"name": "helpdesk", "task": {"type": "chat", "instruction": INSTRUCTION, "max_new_tokens": 8},
              "data": {"train": "train.jsonl", "test": "test.jsonl", "split": {"valid": 0.0}}, "model": {"base": str(tiny_model_dir)},
              "method": {"kind": "lora", "r": 4},
              "train": {"max_steps": 3, "batch_size": 4, "max_seq_len": 128, "lr": 2e-2, "seed": 3, "bf16": False},
              "eval": {"baselines": ["zero_shot", "few_shot"], "shots": 2, "batch_size": 8, "latency_examples": 1, "n_resamples": 100}}
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    ws = root / "ws"
    checked = pipeline.check(path, workspace=ws)
    adapter = pipeline.train(path, workspace=ws)
    eval_dir = pipeline.evaluate(path, workspace=ws, adapter=adapter)
    return {"checked": checked, "adapter": adapter, "eval_dir": eval_dir, "test": test, "base": tiny_model_dir}


def test_check_counts_the_loss_on_every_trained_turn(served: dict[str, Any]) -> None:
    stats = served["checked"].manifest["stats"]
    assert stats["rows"] == {"train": 15, "valid": 0, "test": 6}
    assert 0 < stats["loss_token_share"] < 1


def test_eval_scores_the_last_reply_with_the_generate_metrics_and_both_prompted_baselines(served: dict[str, Any]) -> None:
    metrics = json.loads((served["eval_dir"] / "metrics.json").read_text())
    assert set(metrics) == {"zero_shot", "few_shot", "micro"}
    for system in metrics.values():
        assert {"rouge_l", "length_ratio", "valid_rate"} <= set(system) and 0 <= system["rouge_l"] <= 1
    rows = [json.loads(line) for line in (served["eval_dir"] / "predictions.jsonl").read_text().splitlines()]
    assert all(r["gold"] == [REPLIES[r["text"].split("about ")[1].split("?")[0]]] for r in rows)


def test_serve_passes_the_whole_conversation_and_answers_what_eval_answered(served: dict[str, Any]) -> None:
    from microtune.config import artifact_recipe
    from microtune.models import BaseModelRef, load_tokenizer
    from microtune.serving import ServeSettings, build_app
    from microtune.tasks import get_task
    from microtune.tasks.render import Renderer

    base = served["base"]
    task = get_task(artifact_recipe(served["adapter"] / "recipe.json").task)
    renderer = Renderer(load_tokenizer(BaseModelRef(str(base), str(base), str(base), "x")))
    lines = served["test"].read_text().splitlines()
    predictions = [json.loads(line) for line in (served["eval_dir"] / "predictions.jsonl").read_text().splitlines()]
    settings = ServeSettings(adapters={"helpdesk": served["adapter"]}, registry=False, bf16=False)
    with Running(build_app(settings, api_keys=[])) as srv:
        for row in predictions:
            messages = json.loads(lines[int(row["source"].rsplit(":", 1)[1]) - 1])["messages"][:-1]
            status, body = call("POST", srv.url + "/v1/chat/completions", {"model": "helpdesk", "messages": messages})
            assert status == 200, body
            assert body["choices"][0]["message"]["content"].strip() == row["micro"]["raw"]  # eval keeps its answers stripped
            assert body["microtune"]["output"] == row["micro"]["pred"]
            whole = renderer.prompt_ids(task.messages(task.example_from_messages(messages)))
            last_only = renderer.prompt_ids(task.messages({"messages": [messages[-1]]}))
            assert body["usage"]["prompt_tokens"] == len(whole) > len(last_only)
            assert body["microtune"]["task"] == "chat"
        assert len(predictions) == 6
        status, body = call("POST", srv.url + "/v1/chat/completions",
                            {"model": "helpdesk", "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
        assert status == 400 and body["error"]["code"] == "invalid_conversation"
        assert "must end with a user message" in body["error"]["message"]
        status, body = call("POST", srv.url + "/v1/completions", {"model": "helpdesk", "prompt": "where is my parcel"})
        assert status == 200 and isinstance(body["choices"][0]["text"], str)


def test_export_merges_a_chat_micro_model_that_answers_what_eval_answered(served: dict[str, Any], tmp_path: Path) -> None:
    """`export --merge` is task-agnostic: the merged chat model, prompted with the conversation, gives eval's replies."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from microtune import pipeline
    from microtune.config import artifact_recipe
    from microtune.models.generation import TextGenerator
    from microtune.tasks import get_task
    from microtune.tasks.render import Renderer

    out = pipeline.export(served["adapter"], merge=tmp_path / "merged")["merge"]
    task = get_task(artifact_recipe(served["adapter"] / "recipe.json").task)
    renderer = Renderer(AutoTokenizer.from_pretrained(out))
    lines = served["test"].read_text().splitlines()
    predictions = [json.loads(line) for line in (served["eval_dir"] / "predictions.jsonl").read_text().splitlines()]
    prompts = [renderer.prompt_ids(task.messages(task.example_from_messages(json.loads(lines[int(r["source"].rsplit(":", 1)[1]) - 1])
                                                                            ["messages"][:-1]))) for r in predictions]
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    answers = TextGenerator(merged, renderer, task.decoder().max_new_tokens).predict(prompts)
    assert [raw for raw, _ in answers] == [r["micro"]["raw"] for r in predictions]
