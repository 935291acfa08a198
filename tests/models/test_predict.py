"""Constrained prediction: always a valid label, prefix caching changes nothing, probabilities are sane."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microtune.models.decoding import END, LabelPredictor, build_trie, common_prefix, length_chunks
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
    predictor = LabelPredictor(tiny_model, Renderer(tokenizer), LABELS, scoring="trie", batch_size=4)
    for label, prob in predictor.predict(_prompts(tokenizer, texts, label_list=True)):
        assert label in LABELS
        assert 0.0 < prob <= 1.0


def test_shared_prefix_cache_matches_one_by_one(tiny_model: Any, tokenizer: Any) -> None:
    texts = ["my card got declined at the shop", "what is my balance", "change my pin", "fraud!", "move money to savings"]
    prompts = _prompts(tokenizer, texts, label_list=True)
    predictor = LabelPredictor(tiny_model, Renderer(tokenizer), LABELS, scoring="trie", batch_size=3)
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
    label, prob = LabelPredictor(tiny_model, renderer, LABELS, scoring="trie").predict([prompt])[0]
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
        preds = LabelPredictor(tiny_model, renderer, labels, scoring="trie", batch_size=4, share_prefix=False).predict(
            _prompts(tokenizer, ["card got declined", "new pin please", "fraud on my account"], label_list=True))
    finally:
        handle.remove()
    assert len(calls) == 1 and all(label in labels for label, _ in preds)


# every label shares its first token with another: each row walks on after the prompt, up to four tokens deep
DEEP = ["credit_limit", "credit_limit_change", "credit_limit_raise", "credit_score", "card", "card_declined"]
TEXTS = ["my card got declined", "raise my limit", "what is my credit score", "fraud!", "new pin", "card", "limit change", "hello"]


def test_branches_hold_every_decision_below_a_token() -> None:
    """One branch per deepest decision, each through the tokens that lead to it; a decided node needs none."""
    from microtune.models.decoding import _branches

    trie = build_trie({"a": [1, 2, 9], "b": [1, 3, 4, 9], "c": [1, 3, 5, 9], "d": [7, 9]})
    assert _branches(trie[7], (7,)) == []
    assert _branches(trie[1], (1,)) == [(1, 3)]  # the choice 2|3 after 1 and 4|5 after 1 3 both read this branch
    assert _branches(trie[1][3], (1, 3)) == [(1, 3)]


def test_branch_forward_walks_the_trie_as_step_by_step_decoding_does(tiny_model: Any, tokenizer: Any) -> None:
    """The two-forward walk (prompt, then every undecided row's branches at once) gives the labels and probabilities
    of the step-by-step walk over full forwards (the uncached decoder), for labels that share up to four tokens."""
    renderer = Renderer(tokenizer)
    prompts = _prompts(tokenizer, TEXTS, label_list=False)
    fast = LabelPredictor(tiny_model, renderer, DEEP, scoring="trie", batch_size=3)
    calls: list[int] = []
    handle = tiny_model.register_forward_hook(lambda *_: calls.append(1))
    try:
        got = fast.predict(prompts)
    finally:
        handle.remove()
    slow = LabelPredictor(tiny_model, renderer, DEEP, scoring="trie", batch_size=3)
    slow.cached = slow.share_prefix = False  # full forwards, one per step
    want = slow.predict(prompts)
    assert [label for label, _ in got] == [label for label, _ in want]
    assert [p for _, p in got] == pytest.approx([p for _, p in want], rel=1e-4)
    assert len(calls) == 1 + 2 * 3  # the shared prefix once, then two forwards per batch of 3 (8 rows: 3 batches), not one per token
    assert {label for label, _ in got} & {"credit_limit", "credit_limit_change", "credit_limit_raise"}  # the deepest decisions ran


def test_length_chunks_cut_where_padding_costs_more_than_a_forward() -> None:
    """A served batch of two micro-models (short chat messages, long reports) is cut in two; rows of like length stay
    in full chunks; every chunk holds at most ``limit`` consecutive rows."""
    assert length_chunks([30] * 16 + [80] * 16, 32, fixed=128) == [range(0, 16), range(16, 32)]
    assert length_chunks([40] * 32 + [42] * 32, 32, fixed=128) == [range(0, 32), range(32, 64)]
    assert length_chunks([20, 21, 22], 32, fixed=128) == [range(0, 3)]
    assert length_chunks([], 8) == []


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 60), max_size=9), st.integers(1, 4), st.integers(0, 50))
def test_length_chunks_are_the_cheapest_cut(lengths: list[int], limit: int, fixed: int) -> None:
    """Against every way to cut the sorted rows into consecutive chunks of at most ``limit``: none costs less."""
    from itertools import combinations

    lengths = sorted(lengths)
    n = len(lengths)

    def cost(chunks: list[range]) -> int:
        return sum(fixed + len(c) * lengths[c[-1]] for c in chunks)

    chunks = length_chunks(lengths, limit, fixed)
    assert [i for c in chunks for i in c] == list(range(n)) and all(0 < len(c) <= limit for c in chunks)
    cuts = (list(zip((0, *bounds), (*bounds, n))) for k in range(n) for bounds in combinations(range(1, n), k))
    feasible = [[range(a, b) for a, b in pieces] for pieces in cuts if all(b - a <= limit for a, b in pieces)]
    assert cost(chunks) == min((cost(c) for c in feasible), default=0)


def test_sorted_batches_answer_in_input_order(tiny_model: Any, tokenizer: Any) -> None:
    """Rows are batched by length; each answer still lands at its prompt's index, whatever order the prompts come in."""
    renderer = Renderer(tokenizer)
    prompts = _prompts(tokenizer, TEXTS, label_list=False)
    predictor = LabelPredictor(tiny_model, renderer, DEEP, scoring="trie", batch_size=3)
    forward = predictor.predict(prompts)
    backward = predictor.predict(prompts[::-1])
    assert [label for label, _ in backward[::-1]] == [label for label, _ in forward]
    assert [p for _, p in backward[::-1]] == pytest.approx([p for _, p in forward], rel=1e-4)


def test_bf16_frozen_weights_give_the_autocast_logits_bit_for_bit_and_are_put_back(tiny_model_dir: Path) -> None:
    """Casting the frozen Linear weights once gives exactly the logits autocast gives with fp32 weights (LoRA layers
    included); the embeddings (tied to the LM head) stay fp32 and every weight is fp32 again afterwards."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from microtune.models.hardware import autocast, bf16_frozen_weights

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    ids = torch.randint(0, 1000, (2, 7))
    with torch.no_grad(), autocast(True):
        want = model(input_ids=ids).logits
        with bf16_frozen_weights(model, True):
            assert model.base_model.model.model.layers[0].mlp.up_proj.lora_A["default"].weight.dtype == torch.bfloat16
            assert model.get_input_embeddings().weight.dtype == torch.float32
            got = model(input_ids=ids).logits
    assert torch.equal(got, want)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_bf16_frozen_weights_leave_trained_weights_alone(tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from microtune.models.hardware import bf16_frozen_weights

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # every weight trains
    with bf16_frozen_weights(model, True):
        assert {p.dtype for p in model.parameters()} == {torch.float32}
