"""JSON constraints per row: a random model's answers parse and follow the extract schema, also when the token budget
runs out; constrained and free rows share a batch; the grammar is compiled once per (schema, tokenizer)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from microtune.models.constrain import JsonTail, _tokenizer, json_object, json_schema
from microtune.models.generation import BatchGenerator, GenRequest
from microtune.tasks import get_task
from microtune.tasks.extract import ExtractConfig

STOP = 2  # <|im_end|>
FIELDS = {"drug": "the drug", "effect": "the effect", "dosage": "the dose", "route": "how it was given"}


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def _schema() -> dict[str, Any]:
    return get_task(ExtractConfig(instruction="Extract.", fields=FIELDS), []).decoder().schema


def _prompts(tokenizer: Any, n: int) -> list[list[int]]:
    return [tokenizer(f"case {i}: the patient took {i} mg of drug{i} and got a rash", add_special_tokens=False)["input_ids"]
            for i in range(n)]


def _follows_schema(text: str) -> bool:
    obj = json.loads(text)
    return list(obj) == list(FIELDS) and all(
        v is None or isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v)) for v in obj.values())


@pytest.mark.parametrize("budget", [24, 48, 80])
def test_random_model_answers_follow_the_schema_whatever_the_budget(tiny_model: Any, tokenizer: Any, budget: int) -> None:
    """A random model never closes a string on its own: without the budget-aware closing these answers are cut."""
    reqs = [GenRequest(p, budget, {STOP}, temperature=1.0 if i % 2 else 0.0, seed=i, constraint=json_schema(_schema(), tokenizer, {STOP}))
            for i, p in enumerate(_prompts(tokenizer, 16))]
    done = BatchGenerator(tiny_model, pad_id=0, max_batch=16, tokenizer=tokenizer).run(reqs)
    for f in done:
        assert _follows_schema(f.text), f.text
        assert len(f.ids) <= budget and f.finish_reason == "stop"


def test_unconstrained_random_answers_are_not_json(tiny_model: Any, tokenizer: Any) -> None:
    """The control: the same rows without the constraint do not parse (so the test above measures the constraint)."""
    done = BatchGenerator(tiny_model, pad_id=0, tokenizer=tokenizer).run([GenRequest(p, 48, {STOP}) for p in _prompts(tokenizer, 4)])
    for f in done:
        with pytest.raises(ValueError):
            json.loads(f.text)


def test_json_object_rows_and_free_rows_share_a_batch(tiny_model: Any, tokenizer: Any) -> None:
    prompts = _prompts(tokenizer, 4)
    free_alone = BatchGenerator(tiny_model, pad_id=0, tokenizer=tokenizer).run([GenRequest(prompts[1], 12)])[0]
    reqs = [GenRequest(prompts[0], 40, {STOP}, constraint=json_object(tokenizer, {STOP})), GenRequest(prompts[1], 12),
            GenRequest(prompts[2], 40, {STOP}, temperature=0.8, seed=3, constraint=json_object(tokenizer, {STOP})),
            GenRequest(prompts[3], 40, {STOP}, constraint=json_schema(_schema(), tokenizer, {STOP}))]
    done = BatchGenerator(tiny_model, pad_id=0, tokenizer=tokenizer).run(reqs)
    assert isinstance(json.loads(done[0].text), dict) and isinstance(json.loads(done[2].text), dict)
    assert _follows_schema(done[3].text)
    assert done[1].ids == free_alone.ids  # a free row is untouched by its constrained neighbours


def test_the_object_complete_ends_the_row(tiny_model: Any, tokenizer: Any) -> None:
    """Once the object closes the row stops (finish ``stop``), long before the budget."""
    c = json_schema({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
                    tokenizer, {STOP})
    f = BatchGenerator(tiny_model, pad_id=0, tokenizer=tokenizer).run([GenRequest(_prompts(tokenizer, 1)[0], 200, {STOP}, constraint=c)])[0]
    assert json.loads(f.text) in ({"ok": True}, {"ok": False})
    assert f.finish_reason == "stop" and len(f.ids) < 20 and c.is_done()


def test_grammar_is_compiled_once_per_schema_and_tokenizer(tokenizer: Any) -> None:
    a = json_schema(_schema(), tokenizer, {STOP})
    b = json_schema(_schema(), tokenizer, {STOP})
    assert a.matcher is not b.matcher  # each row its own matcher …
    assert len(_tokenizer(tokenizer, {STOP}).grammars) >= 1
    before = len(_tokenizer(tokenizer, {STOP}).grammars)
    json_schema(_schema(), tokenizer, {STOP})
    assert len(_tokenizer(tokenizer, {STOP}).grammars) == before  # … copied from one compiled grammar


def test_a_json_constraint_needs_a_stop_id(tokenizer: Any) -> None:
    with pytest.raises(ValueError, match="end-of-turn"):
        json_object(tokenizer, set())


def test_json_tail_tracks_what_closing_costs() -> None:
    tail = JsonTail()
    assert tail.closers() == ["{"]
    tail.feed('{"drug": ["a", "b')
    assert tail.in_string and tail.stack == ["{", "["] and tail.keys == {"drug"}
    assert tail.closers() == ['"']
    tail.feed('"')
    assert tail.closers() == ["]", ","]
    tail.feed('], "effect": "x \\')
    assert tail.escape and tail.closers() == ["n"]
    tail.feed('n"')
    assert tail.closers() == ["}", ","]
    assert tail.closing_cost({"drug": 5, "effect": 5, "route": 6}) == 1 + 1 + 6
    tail.feed("}")
    assert tail.expect == "done"
