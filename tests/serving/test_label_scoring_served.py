"""The server decodes each classify model with the scorer its recipe.json records (``task.scoring``), as eval did:
a ``loglik`` model and a ``trie`` model answered in one mixed-adapter batch give eval's answers, and a loglik model's
``top_logprobs`` are its softmax over every answer."""
from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from microtune.serving import ServeSettings
from serve_helpers import Running, eval_answers, held_app, wait_for, write_recipe

TEXTS = ["where is my parcel", "refund my order please", "the invoice is wrong", "delivery is late"]
pytestmark = pytest.mark.slow  # trains two adapters (about a minute on a shared 2-core machine), like the other serving tests


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    """`topic` (3 labels) scored by loglik, `route` (2 other labels) by the trie walk; both LoRA, so they share a batch."""
    from microtune import pipeline

    root = tmp_path_factory.mktemp("scoring")
    out = {}
    for name, coarse, scoring in (("topic", False, "loglik"), ("route", True, "trie")):
        path = write_recipe(root / name, name, tiny_model_dir, coarse, train={"epochs": 1})
        recipe = yaml.safe_load(path.read_text())
        recipe["task"]["scoring"] = scoring
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        out[name] = pipeline.train(path, workspace=root / "ws")
    return out


def test_recipe_json_records_the_scorer(trained: dict[str, Path]) -> None:
    from microtune.config import artifact_recipe

    assert artifact_recipe(trained["topic"] / "recipe.json").task.scoring == "loglik"
    assert artifact_recipe(trained["route"] / "recipe.json").task.scoring == "trie"


def test_serve_answers_with_each_models_scorer_in_one_mixed_batch(trained: dict[str, Path], tiny_model_dir: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import microtune.serving.engine as engine_module

    used: list[tuple[str, int]] = []

    class Spy(engine_module.LabelPredictor):
        def _batched(self, prompts: Any, *args: Any) -> Any:
            used.append((self.scoring, len(prompts)))
            return super()._batched(prompts, *args)

    monkeypatch.setattr(engine_module, "LabelPredictor", Spy)
    expected = {name: dict(zip(TEXTS, eval_answers(trained[name], tiny_model_dir, TEXTS))) for name in trained}
    app, engine = held_app(ServeSettings(adapters=trained, registry=False, bf16=False, max_batch=16), gate_open=False)
    with Running(app) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        asks = [(name, text) for text in TEXTS for name in ("topic", "route")]
        answers: dict[tuple[str, str], Any] = {}

        def ask(name: str, text: str) -> None:
            answers[(name, text)] = c.chat.completions.create(model=name, messages=[{"role": "user", "content": text}],
                                                              logprobs=True, top_logprobs=3)

        threads = [threading.Thread(target=ask, args=item) for item in asks]
        for t in threads:
            t.start()
        wait_for(lambda: engine.queue.qsize() == len(asks), "every request queued")
        engine.gate.set()
        for t in threads:
            t.join(120)
    assert sorted(used) == [("loglik", len(TEXTS)), ("trie", len(TEXTS))]  # one batch, split by scorer only
    for (name, text), r in answers.items():
        label, prob = expected[name][text]
        entry = r.choices[0].logprobs.content[0]
        assert r.choices[0].message.content == label
        assert r.model_extra["microtune"]["probability"] == pytest.approx(prob, rel=1e-4)
        top = entry.top_logprobs
        assert sum(math.exp(t.logprob) for t in top) == pytest.approx(1.0, rel=1e-4)  # every answer of the set, a distribution
        assert dict((t.token, t.logprob) for t in top)[label] == pytest.approx(math.log(prob), abs=1e-4)


def test_loglik_ranks_every_answer_only_for_the_rows_that_ask(trained: dict[str, Path], tiny_model_dir: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """In one batch, the loglik rows that ask for top_logprobs are ranked whole and the others predicted with pruning
    (only the answers that can still win are scored); both give eval's answers."""
    import microtune.serving.engine as engine_module

    calls: list[tuple[str, int]] = []

    class Spy(engine_module.LabelPredictor):
        def predict(self, prompts: Any, *args: Any, **kwargs: Any) -> Any:
            calls.append(("predict", len(prompts)))
            return super().predict(prompts, *args, **kwargs)

        def rank(self, prompts: Any, *args: Any, **kwargs: Any) -> Any:
            calls.append(("rank", len(prompts)))
            return super().rank(prompts, *args, **kwargs)

    monkeypatch.setattr(engine_module, "LabelPredictor", Spy)
    expected = dict(zip(TEXTS, eval_answers(trained["topic"], tiny_model_dir, TEXTS)))
    app, engine = held_app(ServeSettings(adapters={"topic": trained["topic"]}, registry=False, bf16=False, max_batch=16),
                           gate_open=False)
    with Running(app) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        answers: dict[str, Any] = {}

        def ask(i: int, text: str) -> None:
            extra = {"logprobs": True, "top_logprobs": 2} if i % 2 else {}
            answers[text] = c.chat.completions.create(model="topic", messages=[{"role": "user", "content": text}], **extra)

        threads = [threading.Thread(target=ask, args=(i, text)) for i, text in enumerate(TEXTS)]
        for t in threads:
            t.start()
        wait_for(lambda: engine.queue.qsize() == len(TEXTS), "every request queued")
        engine.gate.set()
        for t in threads:
            t.join(120)
    assert sorted(calls) == [("predict", 2), ("rank", 2)]
    for i, text in enumerate(TEXTS):
        label, prob = expected[text]
        assert answers[text].choices[0].message.content == label
        assert answers[text].model_extra["microtune"]["probability"] == pytest.approx(prob, rel=1e-3)
        assert len(answers[text].choices[0].logprobs.content[0].top_logprobs) == (2 if i % 2 else 0)
