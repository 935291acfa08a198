"""Constrained prediction: always a valid label, prefix caching changes nothing, probabilities are sane."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microtune.models.decoding import END, LabelPredictor, build_trie, common_prefix
from microtune.tasks import ClassifyConfig, get_task
from microtune.tasks.render import Renderer

LABELS = ["balance", "balance_transfer", "card_declined", "pin_change", "report_fraud"]


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def test_trie_paths_end_with_label() -> None:
    trie = build_trie({"a": [1, 2, 9], "b": [1, 3, 9]})
    assert set(trie) == {1}
    assert trie[1][2][9][END] == "a" and trie[1][3][9][END] == "b"


def test_common_prefix_leaves_one_token() -> None:
    assert common_prefix([[1, 2, 3, 4], [1, 2, 3, 5]]) == 3
    assert common_prefix([[1, 2, 3], [1, 2, 3, 4]]) == 2
    assert common_prefix([[7, 8]]) == 1
    assert common_prefix([[1], [2]]) == 0


def test_completion_ends_with_end_of_turn(tokenizer: Any) -> None:
    renderer = Renderer(tokenizer)
    assert renderer.completion_ids("balance")[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompt, completion = renderer.encode([{"role": "user", "content": "word " * 500}], "balance", 64)
    assert len(prompt) + len(completion) <= 64
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")


def _prompts(tokenizer: Any, texts: list[str], label_list: bool) -> list[list[int]]:
    renderer = Renderer(tokenizer)
    task = get_task(ClassifyConfig(instruction="Name the banking intent."), LABELS)
    return [renderer.prompt_ids(task.messages({"text": t, "label": ""}, label_list=label_list)) for t in texts]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=6))
@pytest.mark.slow
def test_every_prediction_is_a_valid_label(tiny_model: Any, tokenizer: Any, texts: list[str]) -> None:
    predictor = LabelPredictor(tiny_model, Renderer(tokenizer), LABELS, batch_size=4)
    for label, prob in predictor.predict(_prompts(tokenizer, texts, label_list=True)):
        assert label in LABELS
        assert 0.0 < prob <= 1.0


def test_shared_prefix_cache_matches_one_by_one(tiny_model: Any, tokenizer: Any) -> None:
    texts = ["my card got declined at the shop", "what is my balance", "change my pin", "fraud!", "move money to savings"]
    prompts = _prompts(tokenizer, texts, label_list=True)
    predictor = LabelPredictor(tiny_model, Renderer(tokenizer), LABELS, batch_size=3)
    batched = predictor.predict(prompts)
    assert common_prefix(prompts) > 20  # the instruction and label list are shared and cached once
    for prompt, (label, prob) in zip(prompts, batched):
        alone_label, alone_prob = predictor.predict([prompt])[0]
        assert alone_label == label
        assert alone_prob == pytest.approx(prob, rel=1e-3)


def test_probability_matches_a_plain_forward(tiny_model: Any, tokenizer: Any) -> None:
    """The reported probability equals the product of renormalised step probabilities from a full forward."""
    import torch

    renderer = Renderer(tokenizer)
    prompt = _prompts(tokenizer, ["what is my balance"], label_list=False)[0]
    label, prob = LabelPredictor(tiny_model, renderer, LABELS).predict([prompt])[0]
    trie, seq, total = build_trie({l: renderer.completion_ids(l) for l in LABELS}), renderer.completion_ids(label), 0.0
    node = trie
    with torch.no_grad():
        logits = tiny_model(torch.tensor([prompt + seq])).logits[0].float()
    for i, tok in enumerate(seq):
        allowed = [t for t in node if t != END]
        lp = torch.log_softmax(logits[len(prompt) - 1 + i, allowed], -1)
        total += float(lp[allowed.index(tok)])
        node = node[tok]
    assert prob == pytest.approx(float(torch.tensor(total).exp()), rel=1e-4)


def test_decoding_stops_once_the_label_is_decided(tiny_model: Any, tokenizer: Any) -> None:
    """Labels told apart by their first token need one forward pass (the prompt), not one per label token."""
    from microtune.models.decoding import settle

    labels = ["card_declined", "pin_change", "report_fraud"]
    renderer = Renderer(tokenizer)
    assert len({renderer.completion_ids(label)[0] for label in labels}) == 3 and min(len(renderer.completion_ids(x)) for x in labels) > 2
    trie = build_trie({label: renderer.completion_ids(label) for label in labels})
    assert all(settle(trie[renderer.completion_ids(label)[0]])[END] == label for label in labels)
    calls = []
    handle = tiny_model.register_forward_hook(lambda *_: calls.append(1))
    try:
        preds = LabelPredictor(tiny_model, renderer, labels, batch_size=4, share_prefix=False).predict(
            _prompts(tokenizer, ["card got declined", "new pin please", "fraud on my account"], label_list=True))
    finally:
        handle.remove()
    assert len(calls) == 1 and all(label in labels for label, _ in preds)
