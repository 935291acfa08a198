"""``loglik`` label scoring: every answer ranked by its full-sequence log-likelihood, equal to a plain forward per label.

The reference in every test is the brute force the scorer must equal: one forward of prompt + label completion per label,
no cache, no batching, the label's token log-probabilities summed. The scorer under test runs behind the shared prefix
cache, in row batches smaller than the prompt list, with a KV budget small enough that the label continuations are split
into several chunks, so the cached, batched and chunked path is what is compared.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from microtune.core.errors import RecipeError
from microtune.models.decoding import LabelPredictor, build_trie, common_prefix
from microtune.tasks import ClassifyConfig, DecoderSpec, get_task
from microtune.tasks.render import Renderer

LABELS = ["balance", "balance_transfer", "card_declined", "pin_change", "report_fraud"]
TEXTS = ["my card got declined at the shop", "what is my balance", "change my pin", "fraud!", "move money to savings"]


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def _prompts(tokenizer: Any, texts: list[str] = TEXTS, label_list: bool = True) -> list[list[int]]:
    task = get_task(ClassifyConfig(instruction="Name the banking intent."), LABELS)
    return [Renderer(tokenizer).prompt_ids(task.messages({"text": t, "label": ""}, label_list=label_list)) for t in texts]


def brute_force(model: Any, renderer: Renderer, prompt: list[int], labels: list[str], **forward: Any) -> dict[str, float]:
    """label → the sum of its completion tokens' log-probabilities, from one plain forward of prompt + completion."""
    import torch

    out = {}
    for label in labels:
        seq = renderer.completion_ids(label)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + seq]), **forward).logits[0].float()
        offset = logits.shape[0] - len(prompt) - len(seq)  # prompt tuning prepends its virtual tokens
        lp = torch.log_softmax(logits, -1)
        out[label] = sum(float(lp[offset + len(prompt) - 1 + j, tok]) for j, tok in enumerate(seq))
    return out


def softmax(scores: dict[str, float]) -> dict[str, float]:
    top = max(scores.values())
    norm = top + math.log(sum(math.exp(v - top) for v in scores.values()))
    return {k: v - norm for k, v in scores.items()}


def test_loglik_ranks_equal_per_label_brute_force_and_sum_to_one(tiny_model: Any, tokenizer: Any) -> None:
    renderer, prompts = Renderer(tokenizer), _prompts(tokenizer)
    predictor = LabelPredictor(tiny_model, renderer, LABELS, batch_size=2, scoring="loglik", kv_positions=200)
    assert common_prefix(prompts) > 20  # the shared prefix cache is in play
    assert len(predictor._chunks([4] * 25, 60)) > 1  # and the label continuations of a batch are split into chunks
    ranked = predictor.rank(prompts)
    for prompt, answers in zip(prompts, ranked):
        want = softmax(brute_force(tiny_model, renderer, prompt, LABELS))
        assert [a for a, _ in answers] == sorted(want, key=lambda a: -want[a])
        for answer, logprob in answers:
            assert logprob == pytest.approx(want[answer], abs=1e-3)
        assert sum(math.exp(lp) for _, lp in answers) == pytest.approx(1.0, abs=1e-6)
    preds = predictor.predict(prompts)
    assert preds == [(answers[0][0], pytest.approx(math.exp(answers[0][1]))) for answers in ranked]
    single = predictor.answer_logprobs(prompts[1])
    assert [a for a, _ in single] == [a for a, _ in ranked[1]]
    assert [lp for _, lp in single] == pytest.approx([lp for _, lp in ranked[1]], abs=1e-4)


@pytest.mark.slow
def test_predict_skips_answers_whose_first_token_bound_cannot_win_and_answers_the_same(tmp_path: Path, make_recipe,
                                                                                      tiny_model_dir: Path) -> None:
    """An answer's first-token log-probability bounds its full log-likelihood, so pruning below the best found never
    changes the answer, whatever the margin; the probability is a lower bound on the exact one (the pruned answers'
    bounds overstate their share). A trained micro-model (here a tiny one, seconds) is peaked enough to prune at margin 0."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from microtune import pipeline
    from toydata import LABELS as TOY_LABELS
    from toydata import TEXTS as TOY_TEXTS

    adapter = pipeline.train(make_recipe(tiny_model_dir, train={"epochs": 20, "lr": 2e-2}), workspace=tmp_path / "ws")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter)).eval()
    renderer = Renderer(AutoTokenizer.from_pretrained(adapter))
    task = get_task(ClassifyConfig(instruction="Route the customer message."), TOY_LABELS)
    prompts = [renderer.prompt_ids(task.messages({"text": TOY_TEXTS[label][i]})) for label in TOY_LABELS for i in range(8)]
    exact = LabelPredictor(model, renderer, TOY_LABELS, batch_size=4, scoring="loglik")
    ranked = exact.rank(prompts)
    for share in (0.5, 1e-9):
        pruned = LabelPredictor(model, renderer, TOY_LABELS, batch_size=4, scoring="loglik", prune_mass=share)
        preds = pruned.predict(prompts)
        assert [label for label, _ in preds] == [answers[0][0] for answers in ranked]
        for (_, prob), answers in zip(preds, ranked):
            exact_prob = math.exp(answers[0][1])
            assert exact_prob / (1 + share) - 1e-6 <= prob <= exact_prob + 1e-6  # low by at most the share, never high
        assert pruned.continued < exact.continued or share < 1e-3  # at a share of one half this model's answers are skipped


def test_loglik_without_the_prefix_cache_and_with_a_large_budget_gives_the_same_ranking(tiny_model: Any, tokenizer: Any) -> None:
    renderer, prompts = Renderer(tokenizer), _prompts(tokenizer, label_list=False)
    small = LabelPredictor(tiny_model, renderer, LABELS, batch_size=2, scoring="loglik", kv_positions=64).rank(prompts)
    whole = LabelPredictor(tiny_model, renderer, LABELS, batch_size=8, scoring="loglik", share_prefix=False).rank(prompts)
    for a, b in zip(small, whole):
        assert [x for x, _ in a] == [x for x, _ in b]
        assert [x for _, x in a] == pytest.approx([x for _, x in b], abs=1e-4)


def test_loglik_differs_from_the_trie_walk_only_in_how_it_scores(tiny_model: Any, tokenizer: Any) -> None:
    """Both answer a label of the set; the trie's probability renormalises per step, loglik's is a softmax over labels."""
    renderer, prompts = Renderer(tokenizer), _prompts(tokenizer)
    trie = LabelPredictor(tiny_model, renderer, LABELS, scoring="trie").predict(prompts)
    loglik = LabelPredictor(tiny_model, renderer, LABELS, scoring="loglik").predict(prompts)
    assert all(label in LABELS and 0 < prob <= 1 for label, prob in trie + loglik)
    assert [p for _, p in trie] != pytest.approx([p for _, p in loglik])


def test_mixed_adapter_batch_equals_each_adapter_alone(tiny_model_dir: Path, tokenizer: Any) -> None:
    """Rows naming different LoRA adapters (PEFT adapter_names), each with its own label set, in one loglik pass =
    each adapter's rows scored alone with that adapter active."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}
    model = get_peft_model(model, LoraConfig(**lora), adapter_name="one")
    model.add_adapter("two", LoraConfig(**lora))
    model.eval()
    renderer = Renderer(tokenizer)
    sets = {"one": LABELS, "two": ["money", "parcel", "refund"]}
    tries = {name: build_trie({label: renderer.completion_ids(label) for label in labels}) for name, labels in sets.items()}
    prompts = _prompts(tokenizer, TEXTS + TEXTS[:1], label_list=False)
    names = ["one", "two", "one", "two", "two", "one"]
    predictor = LabelPredictor(model, renderer, [], batch_size=4, scoring="loglik", kv_positions=150)
    together = predictor.rank(prompts, adapter_names=names, tries=[tries[n] for n in names])
    for name in ("one", "two"):
        model.set_adapter(name)
        rows = [i for i, n in enumerate(names) if n == name]
        alone = LabelPredictor(model, renderer, sets[name], scoring="loglik").rank([prompts[i] for i in rows])
        for i, answers in zip(rows, alone):
            assert [a for a, _ in together[i]] == [a for a, _ in answers]
            assert [lp for _, lp in together[i]] == pytest.approx([lp for _, lp in answers], abs=1e-4)
        want = softmax(brute_force(model, renderer, prompts[rows[0]], sets[name]))
        assert dict(together[rows[0]]) == pytest.approx(want, abs=1e-3)


@pytest.mark.parametrize("kind", ["prompt_tuning", "prefix_tuning"])
def test_virtual_token_methods_score_without_the_cache(tiny_model_dir: Path, tokenizer: Any, kind: str) -> None:
    import torch
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(4)
    config = (PromptTuningConfig if kind == "prompt_tuning" else PrefixTuningConfig)(task_type="CAUSAL_LM", num_virtual_tokens=4)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config).eval()
    renderer, prompts = Renderer(tokenizer), _prompts(tokenizer, TEXTS[:3], label_list=False)
    predictor = LabelPredictor(model, renderer, LABELS, batch_size=2, scoring="loglik", kv_positions=200)
    assert not predictor.cached
    for prompt, answers in zip(prompts, predictor.rank(prompts)):
        want = softmax(brute_force(model, renderer, prompt, LABELS))
        assert dict(answers) == pytest.approx(want, abs=1e-3)


def test_multi_label_loglik_ranks_the_label_set_answers(tiny_model: Any, tokenizer: Any) -> None:
    """With multi_label the answers are the label-set strings the model is trained to write: loglik ranks those."""
    task = get_task(ClassifyConfig(instruction="Tag it.", multi_label=True, max_labels=2, scoring="loglik"), LABELS[:3])
    spec = task.decoder()
    assert spec.scoring == "loglik" and "balance; card_declined" in spec.candidates
    renderer = Renderer(tokenizer)
    prompt = renderer.prompt_ids(task.messages({"text": "declined and low balance"}))
    answers = LabelPredictor(tiny_model, renderer, spec.candidates, scoring="loglik").rank([prompt])[0]
    assert sorted(a for a, _ in answers) == sorted(spec.candidates)
    assert dict(answers) == pytest.approx(softmax(brute_force(tiny_model, renderer, prompt, spec.candidates)), abs=1e-3)


def test_an_unknown_scoring_is_a_recipe_error_naming_the_choices(tmp_path: Path) -> None:
    from microtune.config import load_recipe

    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": "x"}\n')
    path = tmp_path / "r.yaml"
    path.write_text("name: r\ntask:\n  type: classify\n  instruction: Tag it.\n  scoring: beam\ndata:\n  train: train.jsonl\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    text = str(err.value) + str(getattr(err.value, "problems", ""))
    assert "scoring" in text and "'trie'" in text and "'loglik'" in text and "beam" in text
    assert load_recipe(path, ["task.scoring=loglik"]).task.scoring == "loglik"
    with pytest.raises(ValueError, match="trie"):
        LabelPredictor(None, None, [], scoring="beam")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kind 'labels' only"):
        DecoderSpec(kind="free", max_new_tokens=8, scoring="trie")  # a generated answer has no candidates to rank


def test_the_scoring_key_leaves_the_recipe_hash_alone(tmp_path: Path) -> None:
    """The scorer reads the same weights: changing it is not a different training run (resume, lineage, rerun checks)."""
    from microtune.config import load_recipe
    from microtune.pipeline.lineage import recipe_hash

    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": "x"}\n')
    path = tmp_path / "r.yaml"
    path.write_text("name: r\ntask:\n  type: classify\n  instruction: Tag it.\ndata:\n  train: train.jsonl\n")
    loglik, trie = load_recipe(path), load_recipe(path, ["task.scoring=trie"])
    assert loglik.resolved()["task"]["scoring"] == "loglik" and trie.resolved()["task"]["scoring"] == "trie"  # recipe.json spells it out
    assert recipe_hash(trie) == recipe_hash(loglik)
    assert recipe_hash(loglik) != recipe_hash(load_recipe(path, ["train.lr=0.01"]))


def test_eval_and_watch_decode_with_the_recipes_scorer(tiny_model: Any, tokenizer: Any) -> None:
    """One decoder path: the predictor eval (and watch's champion check) builds follows the task's scorer."""
    from microtune.evaluation.runner import _predictor

    renderer = Renderer(tokenizer)
    for scoring in ("trie", "loglik"):
        task = get_task(ClassifyConfig(instruction="Name the banking intent.", scoring=scoring), LABELS)
        predictor = _predictor(task, tiny_model, renderer, 4, False)
        assert isinstance(predictor, LabelPredictor) and predictor.scoring == scoring
    assert get_task(ClassifyConfig(instruction="x"), LABELS).decoder().scoring == "loglik"  # the default, as measured (BENCHMARKS.md)


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_the_token_tree_scores_what_one_sequence_per_answer_scores(tiny_model_dir: Path, tokenizer: Any, kernel: str) -> None:
    """loglik's continuations as token trees (a 4D mask: each node sees the prompt, its ancestors and itself), a row's
    answers packed into trees no wider than the longest answer,
    give every answer the log-likelihood of its own sequence, under SDPA's boolean mask and eager's additive one, with
    the tree split into chunks; labels sharing a prefix ("balance", "balance_transfer") share its nodes."""
    from transformers import AutoModelForCausalLM

    from microtune.models.decoding import _tree

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=kernel).eval()
    renderer, prompts = Renderer(tokenizer), _prompts(tokenizer)
    tree = LabelPredictor(model, renderer, LABELS, batch_size=3, scoring="loglik", kv_positions=300)
    pairs = LabelPredictor(model, renderer, LABELS, batch_size=3, scoring="loglik", kv_positions=300, tree=False)
    assert tree.tree and not pairs.tree
    ranked = tree.rank(prompts)
    assert tree.tree_rounds and not pairs.tree_rounds
    for a, b, prompt in zip(ranked, pairs.rank(prompts), prompts):
        assert [x for x, _ in a] == [x for x, _ in b]
        assert [x for _, x in a] == pytest.approx([x for _, x in b], abs=1e-4)
        assert dict(a) == pytest.approx(softmax(brute_force(model, renderer, prompt, LABELS)), abs=1e-3)
    seqs = [renderer.completion_ids(label)[:-1] for label in LABELS]
    tokens, parents, paths = _tree(seqs)
    assert len(tokens) < sum(len(s) for s in seqs)  # shared prefixes are fed once
    assert [[tokens[n] for n in path] for path in paths] == seqs
    assert all(parents[path[0]] == -1 and all(parents[n] == m for m, n in zip(path, path[1:])) for path in paths)


def test_packing_puts_every_answer_once_into_trees_of_its_row_and_picks_the_width_that_feeds_least() -> None:
    """`_packed`: one sequence per answer pads short answers to the longest, one tree per row pads every row to the
    row continuing most answers but shares prefixes and copies the row's KV once. Rows continuing few answers beside
    one continuing many (a trained micro-model) get units as wide as the longest answer; a long context, whose copy
    per unit costs more than the padding, gets one tree per row (a base model prompted with the label list)."""
    from microtune.models.decoding import _packed, _tree

    answers = {"a": [5, 6, 7, 8, 2], "ab": [5, 6, 9, 2], "b": [4, 2], "c": [3, 4, 2], "d": [1, 2]}
    pairs = [(row, name, tokens) for row in range(5) for name, tokens in answers.items()]
    todo = [k for k, (row, name, _) in enumerate(pairs) if row == 0 or name == "a"]  # row 0 every answer, rows 1-4 one

    def widths(units: list[tuple[int, list[int]]]) -> list[int]:
        return [len(_tree([pairs[k][2][:-1] for k in ks])[0]) for _, ks in units]

    for context in (0, 1000):
        units = _packed(todo, pairs, context)
        assert sorted(k for _, ks in units for k in ks) == sorted(todo)
        assert all(pairs[k][0] == row for row, ks in units for k in ks)
    narrow, whole = _packed(todo, pairs, 0), _packed(todo, pairs, 1000)
    # row 0: a (4 nodes) fills a unit; ab (5, 6, 9: with a it would make 5 nodes) opens a second, c a third; b and d fill
    assert max(widths(narrow)) == 4 and sorted(w for (row, _), w in zip(narrow, widths(narrow)) if row == 0) == [3, 4, 4]
    assert len(narrow) * 4 < len(whole) * max(widths(whole))  # fewer positions fed: 7 units × 4 against 5 × 9
    assert len(whole) == 5 and widths(whole)[0] == 9  # one unit a row: the whole tree of row 0 shares 5, 6 once
