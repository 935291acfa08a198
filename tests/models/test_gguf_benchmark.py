"""The GGUF agreement benchmark's two halves, without llama.cpp.

`benchmarks/gguf_llama_worker.py` re-implements microtune's greedy trie walk on llama.cpp's logits (it runs in
llama-cpp-python's own venv and cannot import microtune). Here a stand-in with llama_cpp.Llama's cache interface
(``n_tokens``, ``input_ids``, ``eval``; the last logits) serves a tiny random Llama's logits, and the worker's labels must be
``LabelPredictor``'s (``scoring: trie``) row for row; the prompt's shared prefix must not be evaluated twice.
`benchmarks/gguf_agreement.py` must refuse, with the build commands and before any export, when the llama.cpp
interpreter is missing.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmark_helpers import load_benchmark
from microtune.models.decoding import LabelPredictor
from microtune.tasks import ClassifyConfig, get_task
from microtune.tasks.render import Renderer

LABELS = ["balance", "balance_transfer", "card_declined", "pin_change", "report_fraud", "apr"]
TEXTS = ["my card got declined at the shop", "what is my balance", "change my pin", "fraud!", "move money to savings",
         "what's the apr on this card"]


class FakeLlama:
    """llama_cpp.Llama's token cache as the worker uses it: ``eval`` appends after ``n_tokens``, ``scores[i]`` are the
    logits after token i. Logits come from a full forward of the cached tokens; ``evaluated`` counts the new tokens."""

    def __init__(self, model: Any):
        self.model, self.tokens, self.n_tokens, self.evaluated, self._scores = model, [], 0, 0, None

    @property
    def input_ids(self) -> list[int]:
        return self.tokens[: self.n_tokens]

    def last_logits(self) -> Any:
        return self._scores[self.n_tokens - 1]

    def eval(self, tokens: list[int]) -> None:
        import torch

        self.tokens = self.tokens[: self.n_tokens] + list(tokens)
        self.n_tokens, self.evaluated = len(self.tokens), self.evaluated + len(tokens)
        with torch.no_grad():
            self._scores = self.model(input_ids=torch.tensor([self.tokens])).logits[0].float().numpy()


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def test_worker_trie_walk_is_microtunes(tiny_model: Any, tokenizer: Any) -> None:
    worker = load_benchmark("gguf_llama_worker")
    renderer = Renderer(tokenizer)
    task = get_task(ClassifyConfig(instruction="Name the banking intent."), LABELS)
    prompts = [renderer.prompt_ids(task.messages({"text": t})) for t in TEXTS]
    expected = [label for label, _ in LabelPredictor(tiny_model, renderer, LABELS, batch_size=4, scoring="trie").predict(prompts)]

    llm = FakeLlama(tiny_model)
    trie = worker.build_trie({label: renderer.completion_ids(label) for label in LABELS})
    got = [worker.walk_trie(llm, p, trie, FakeLlama.last_logits)[0] for p in prompts]

    assert got == expected
    assert len(set(got)) > 1  # a random model that picks one label for everything would prove little
    first_ids = len(prompts[0])
    assert llm.evaluated < first_ids * len(prompts)  # the system prompt, shared by every row, is evaluated once


def test_worker_eval_tokens_keeps_one_token_to_evaluate(tiny_model: Any) -> None:
    worker = load_benchmark("gguf_llama_worker")
    llm = FakeLlama(tiny_model)
    worker.eval_tokens(llm, [5, 6, 7], FakeLlama.last_logits)
    before = llm.evaluated
    scores = worker.eval_tokens(llm, [5, 6, 7], FakeLlama.last_logits)  # the same prompt again: its last token is evaluated afresh for logits

    assert llm.evaluated - before == 1
    assert llm.input_ids == [5, 6, 7] and scores.shape[-1] == tiny_model.config.vocab_size


def test_agreement_refuses_without_llama_cpp(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_benchmark("gguf_agreement")
    with pytest.raises(SystemExit) as missing:
        bench.llama_version(tmp_path / "no-venv" / "bin" / "python")
    assert "pip install llama-cpp-python" in str(missing.value) and "Nothing was exported" in str(missing.value)

    if importlib.util.find_spec("llama_cpp") is None:  # this interpreter exists but lacks the package
        with pytest.raises(SystemExit) as no_package:
            bench.llama_version(Path(sys.executable))
        assert no_package.value.code == 2
        assert "cannot import llama_cpp" in capsys.readouterr().err
