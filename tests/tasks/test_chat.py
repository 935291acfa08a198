"""Task `chat`: OpenAI chat rows read whole, every turn-order problem at file:line, loss on exactly the chosen assistant
turns (answer + end-of-turn), eval's and serve's prompt = the conversation before the reply, synth refused at check."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from microtune.config import load_recipe, validate_recipe
from microtune.core.errors import DataError, RecipeError
from microtune.data import build_dataset
from microtune.tasks import ChatConfig, get_task
from microtune.tasks.render import IGNORE, Renderer, encode_example, labels_of
from toydata import LABELS, TEXTS, write_jsonl

INSTRUCTION = "Help the customer in a few words."
REPLIES = {"billing": "let me check the charge", "shipping": "let me track the parcel", "refund": "i will start the refund"}


def conversation(label: str, i: int, system: bool = False) -> dict[str, Any]:
    """A two-exchange support conversation: the customer's message, a question back, an answer, the reply."""
    turns = [{"role": "user", "content": TEXTS[label][i]}, {"role": "assistant", "content": f"is this about {label}?"},
             {"role": "user", "content": f"yes, {label} number {i}"}, {"role": "assistant", "content": REPLIES[label]}]
    return {"messages": ([{"role": "system", "content": "You are the support desk."}] if system else []) + turns}


def chat_rows(indices: range) -> list[dict[str, Any]]:
    return [conversation(label, i, system=i % 2 == 0) for i in indices for label in LABELS]


def chat_recipe(tmp_path: Path, make_recipe, base: Path, **task: Any) -> Path:
    write_jsonl(tmp_path / "train.jsonl", chat_rows(range(0, 5)))
    write_jsonl(tmp_path / "test.jsonl", chat_rows(range(5, 7)))
    section = {"type": "chat", "instruction": INSTRUCTION, "labels": None, "max_new_tokens": 8, **task}
    return make_recipe(base, data={"train": "train.jsonl", "test": "test.jsonl", "split": {"valid": 0.0}}, task=section,
                       train={"max_steps": 3, "max_seq_len": 128, "bf16": False}, eval={"baselines": ["zero_shot", "few_shot"],
                                                                                         "latency_examples": 1, "n_resamples": 100})


# -- rows -----------------------------------------------------------------------------------------
def test_rows_keep_the_system_message_and_every_earlier_turn(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    result = build_dataset(load_recipe(chat_recipe(tmp_path, make_recipe, tiny_model_dir)))
    first = next(e for e in result.splits["train"] if e["source"].endswith("train.jsonl:1"))
    assert first["messages"] == [{"role": "system", "content": "You are the support desk."}, *conversation("billing", 0)["messages"][:3]]
    assert first["target"] == REPLIES["billing"] and first["references"] == [REPLIES["billing"]] and first["weight"] == 1
    assert first["text"] == f"user: {TEXTS['billing'][0]}\nassistant: is this about billing?\nuser: yes, billing number 0"
    assert result.labels == [] and result.sources["train"]["format"] == "openai_chat"


def test_check_reports_every_turn_order_problem_of_every_line(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    recipe = chat_recipe(tmp_path, make_recipe, tiny_model_dir)
    u, a = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
    bad = [
        conversation("billing", 0),  # line 1: fine
        {"messages": [a, u, a]},  # 2: starts with the assistant
        {"messages": [u, u, a]},  # 3: two user turns in a row
        {"messages": [u, a, u]},  # 4: ends with the user
        {"messages": [u, a, {"role": "system", "content": "late"}, u, a]},  # 5: a system message in the middle
        {"messages": [u, {"role": "assistant", "content": "  "}]},  # 6: empty content
        {"messages": [u, {"role": "tool", "content": "42"}, a]},  # 7: unknown role
        {"messages": [u, {**a, "weight": 2}]},  # 8: weight not 0/1
        {"messages": [{**u, "weight": 1}, a]},  # 9: weight on a user message
        {"messages": [u, {**a, "weight": 0}]},  # 10: nothing to train
        {"messages": []},  # 11: no messages
        {"text": "hi"},  # 12: not a chat row
        {"messages": [u, a], "tools": [{"type": "function"}]},  # 13: tools declared
    ]
    train = write_jsonl(tmp_path / "train.jsonl", bad)
    with pytest.raises(DataError) as err:
        build_dataset(load_recipe(recipe))
    problems = [str(p) for p in err.value.problems]
    expected = {
        2: "messages[0]: the conversation must start with a user message (after the optional system message), not assistant",
        3: "messages[1]: two user messages in a row; user and assistant turns must alternate",
        4: "the conversation must end with an assistant message (the reply to train on), not user",
        5: "messages[2]: a system message may only come first",
        6: "messages[1] (assistant): empty content",
        7: "messages[1]: unknown role 'tool'; use system, user or assistant (tool and function messages are not supported",
        8: "messages[1] (assistant): weight must be 0 or 1 (got 2)",
        9: "messages[0] (user): `weight` is only for assistant messages",
        10: "every assistant message has weight 0: nothing to train on",
        11: "field 'messages' must be a non-empty list",
        12: "missing field 'messages'",
        13: "`tools` is not supported: a chat micro-model answers in text and does not call tools",
    }
    for line, message in expected.items():
        assert any(p.startswith(f"{train}:{line}: {message}") for p in problems), (line, problems)
    assert not any(p.startswith(f"{train}:1:") for p in problems)
    assert sum(p.startswith(f"{train}:5:") for p in problems) == 1  # the turns around the late system message still alternate
    assert sum(p.startswith(f"{train}:8:") for p in problems) == 1  # a broken message is reported once, not again as a turn


def test_loss_on_last_refuses_weights_it_cannot_honour(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    recipe = chat_recipe(tmp_path, make_recipe, tiny_model_dir, loss_on="last")
    u, a = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
    train = write_jsonl(tmp_path / "train.jsonl", [{"messages": [u, {**a, "weight": 1}, u, a]}, {"messages": [u, a, u, {**a, "weight": 0}]},
                                                   {"messages": [u, {**a, "weight": 0}, u, {**a, "weight": 1}]}])
    with pytest.raises(DataError) as err:
        build_dataset(load_recipe(recipe))
    problems = [str(p) for p in err.value.problems]
    assert any(p.startswith(f"{train}:1: messages[1]: weight 1 on an earlier assistant message, but task.loss_on: last") for p in problems)
    assert any(p.startswith(f"{train}:2: messages[3]: the last assistant message has weight 0, but task.loss_on: last") for p in problems)
    assert not any(p.startswith(f"{train}:3:") for p in problems)  # weights that agree with loss_on: last are fine


def test_a_generate_recipe_reading_chat_rows_still_takes_the_last_user_and_assistant(tmp_path: Path, make_recipe,
                                                                                    tiny_model_dir: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", chat_rows(range(0, 3)))
    recipe = make_recipe(tiny_model_dir, data={"train": "train.jsonl", "split": {"valid": 0.0, "test": 0.0}},
                         task={"type": "generate", "instruction": INSTRUCTION, "labels": None})
    rows = build_dataset(load_recipe(recipe)).splits["train"]
    first = next(e for e in rows if e["source"].endswith(":1"))
    assert first == {"text": "yes, billing number 0", "target": REPLIES["billing"], "references": [REPLIES["billing"]],
                     "source": first["source"]}


# -- training encoding ----------------------------------------------------------------------------
def _spans(ids: list[int], pieces: list[list[int]]) -> list[int]:
    """Positions of ``pieces`` found in order in ``ids`` (each after the previous one)."""
    found, start = [], 0
    for piece in pieces:
        at = next(i for i in range(start, len(ids) - len(piece) + 1) if ids[i:i + len(piece)] == piece)
        found += range(at, at + len(piece))
        start = at + len(piece)
    return found


WEIGHTED = {"messages": [{"role": "system", "content": "You are the support desk."}, {"role": "user", "content": "my card was charged twice"},
                         {"role": "assistant", "content": "which card?", "weight": 1}, {"role": "user", "content": "the debit card"},
                         {"role": "assistant", "content": "is it the one ending in 42?", "weight": 0},
                         {"role": "user", "content": "yes"}, {"role": "assistant", "content": "i have refunded the second charge"}]}


@pytest.mark.parametrize(("loss_on", "trained"), [("all", ["which card?", "i have refunded the second charge"]),
                                                  ("last", ["i have refunded the second charge"])])
def test_the_label_mask_covers_exactly_the_chosen_assistant_turns_with_their_end_of_turn(tokenizer: Any, loss_on: str,
                                                                                       trained: list[str]) -> None:
    """``all`` honours OpenAI's weight (the weight-0 turn gets no loss), ``last`` trains the last reply only; each trained
    turn is its answer ids + the end-of-turn marker, exactly as the model generates it, and nothing else is labelled."""
    renderer, cfg = Renderer(tokenizer), ChatConfig(instruction=INSTRUCTION, loss_on=loss_on)
    task = get_task(cfg)
    row = WEIGHTED if loss_on == "all" else {"messages": [{k: v for k, v in m.items() if k != "weight"} for m in WEIGHTED["messages"]]}
    example, problems = task.normalize(row, cfg)
    assert problems == [] and example is not None
    prompt, completion, labels = encode_example(task, example, renderer, 1024)
    ids = prompt + completion
    assert len(labels) == len(ids) and labels_of((prompt, completion, labels)) == labels
    pieces = [renderer.completion_ids(text) for text in trained]
    expected = _spans(ids, pieces)
    labelled = [i for i, label in enumerate(labels) if label != IGNORE]
    assert labelled == expected and [labels[i] for i in labelled] == [ids[i] for i in labelled]
    assert tokenizer.decode([labels[i] for i in labelled]) == "".join(f"{t}<|im_end|>" for t in trained)
    # eval and serve prompt the model with the conversation before the reply: the same ids training saw
    assert prompt == renderer.prompt_ids(task.messages(example)) and completion == renderer.completion_ids(example["target"])
    assert tokenizer.decode(prompt).count("is it the one ending in 42?") == 1  # the untrained turn is still context


def test_a_conversation_too_long_loses_its_earliest_exchanges_first(tokenizer: Any) -> None:
    renderer, cfg = Renderer(tokenizer), ChatConfig(instruction=INSTRUCTION)
    task = get_task(cfg)
    example, _ = task.normalize(WEIGHTED, cfg)
    full = encode_example(task, example, renderer, 1024)
    short = encode_example(task, example, renderer, len(full[0]) + len(full[1]) - 5)
    text = tokenizer.decode(short[0])
    assert "You are the support desk." in text and "charged twice" not in text and "which card?" not in text
    assert short[1] == full[1] and len(short[0]) + len(short[1]) < len(full[0]) + len(full[1])
    assert [t for t in short[2] if t != IGNORE] == full[1]  # the weight-1 first reply went with its exchange
    eval_prompt, _ = renderer.encode(task.messages(example), example["target"], len(full[0]) + len(full[1]) - 5)
    assert eval_prompt == short[0]  # eval cuts a long conversation the way training does


def test_padded_and_packed_batches_of_conversations_train_the_same_tokens(tokenizer: Any, tiny_model_dir: Path) -> None:
    """Two conversations sharing a trained first exchange: the shared prefix that packing runs once stops before it, so the
    packed batch labels every trained token and gives the padded batch's loss."""
    from microtune.training.batching import collate
    from microtune.training.engine import completion_loss
    from microtune.training.packing import pack

    renderer, cfg = Renderer(tokenizer), ChatConfig(instruction=INSTRUCTION)
    task = get_task(cfg)
    rows = [{"messages": [*WEIGHTED["messages"][:5], {"role": "user", "content": f"answer {i}"}, {"role": "assistant", "content": f"done {i}"}]}
            for i in range(3)]
    examples = [encode_example(task, task.normalize(r, cfg)[0], renderer, 1024) for r in rows]
    trained = sorted(t for e in examples for t in labels_of(e) if t != IGNORE)
    padded, packed = collate(examples, 0), pack(examples, 0, capacity=4096)
    assert sorted(t for t in padded["labels"].flatten().tolist() if t != IGNORE) == trained
    assert sorted(t for t in packed["labels"].flatten().tolist() if t != IGNORE) == trained
    first_trained = min(labels_of(examples[0]).index(t) for t in labels_of(examples[0]) if t != IGNORE)
    assert 0 < packed["prefix_ids"].shape[1] < first_trained
    model = _lora_model(tiny_model_dir)
    assert completion_loss(model, packed)[0].item() == pytest.approx(completion_loss(model, padded)[0].item(), rel=1e-5)


def _lora_model(tiny_model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    from microtune.config import LoraConfig
    from microtune.models import apply_method

    return apply_method(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4), 0)


# -- prompts, recipe rules, serving's conversation, watch ------------------------------------------
def test_prompted_baselines_get_the_conversation_and_few_shot_shows_whole_conversations() -> None:
    cfg = ChatConfig(instruction=INSTRUCTION)
    task = get_task(cfg)
    example, _ = task.normalize(conversation("refund", 1), cfg)
    zero = task.messages(example, label_list=True)
    assert zero == [{"role": "system", "content": INSTRUCTION}, *conversation("refund", 1)["messages"][:3]]
    shot, _ = task.normalize(conversation("billing", 2, system=True), cfg)
    few = task.messages(example, label_list=True, shots=[shot])
    assert few[1:] == zero[1:] and few[0]["content"].startswith(INSTRUCTION)
    assert f"user: {TEXTS['billing'][2]}\nassistant: is this about billing?\nuser: yes, billing number 2\nassistant: {REPLIES['billing']}" \
        in few[0]["content"]
    assert task.baselines == ("zero_shot", "few_shot")


def test_recipe_rules_of_the_chat_section() -> None:
    raw = {"name": "x", "data": {"train": "t.jsonl"}, "task": {"type": "chat", "instruction": "go"}}
    recipe = validate_recipe(raw)
    assert isinstance(recipe.task, ChatConfig) and recipe.task.loss_on == "all" and recipe.metric_names() == ["rouge_l", "length_ratio"]
    with pytest.raises(RecipeError, match="`microtune synth` does not support task.type chat: synth writes one input and one answer"):
        validate_recipe(raw | {"synth": {"per_label": 5, "teacher": {"base_url": "http://127.0.0.1:1/v1", "model": "m"}}})
    with pytest.raises(RecipeError, match="text_field does not apply to task.type chat"):
        validate_recipe(raw | {"task": raw["task"] | {"text_field": "prompt"}})
    with pytest.raises(RecipeError, match="baseline 'lead' does not fit task.type chat"):
        validate_recipe(raw | {"eval": {"baselines": ["lead"]}})
    with pytest.raises(RecipeError, match="loss_on"):
        validate_recipe(raw | {"task": raw["task"] | {"loss_on": "first"}})


def test_a_served_conversation_becomes_the_prompt_eval_uses() -> None:
    cfg = ChatConfig(instruction=INSTRUCTION)
    task = get_task(cfg)
    row = conversation("shipping", 3, system=True)
    example, _ = task.normalize(row, cfg)
    sent = [{"role": "developer" if m["role"] == "system" else m["role"], "content": m["content"]} for m in row["messages"][:-1]]
    assert task.messages(task.example_from_messages(sent)) == task.messages(example)
    with pytest.raises(ValueError, match="must end with a user message"):
        task.example_from_messages(row["messages"])
    with pytest.raises(ValueError, match="two user messages in a row"):
        task.example_from_messages([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_watch_stores_a_conversation_as_the_row_it_came_from() -> None:
    from microtune.pipeline.watch import _raw

    cfg = ChatConfig(instruction=INSTRUCTION)
    task = get_task(cfg)
    example, _ = task.normalize(WEIGHTED, cfg)
    stored = json.loads(json.dumps(_raw(example)))
    assert stored["text"] == example["text"]  # what watch's drift, holdout and leakage checks read
    assert task.normalize(stored, cfg) == (example, [])


def test_predict_reads_a_conversation_to_answer_or_a_whole_row_as_eval_does(tmp_path: Path) -> None:
    """`microtune predict` on chat rows: a conversation ending with the user turn, or a training row whose last reply is
    dropped; both give the prompt eval builds, and a broken turn order is a reject at its line."""
    from microtune.data.inputs import read_inputs
    from microtune.tasks import TASKS

    cfg = ChatConfig(instruction=INSTRUCTION)
    task = get_task(cfg)
    whole = conversation("billing", 1, system=True)
    open_ = {"messages": whole["messages"][:-1]}
    broken = {"messages": [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "hi"}]}
    write_jsonl(tmp_path / "in.jsonl", [whole, open_, broken])
    inputs = read_inputs(TASKS["chat"], cfg, tmp_path / "in.jsonl")
    expected = task.messages(task.normalize(whole, cfg)[0])
    assert [task.messages(r.example) for r in inputs.rows] == [expected, expected]
    assert [r["source"] for r in inputs.rejects] == [f"{tmp_path / 'in.jsonl'}:3"] and not inputs.fatal
