"""Structured-generation libraries compared on what microtune's JSON decoding pays for, on CPU.

    .venv/bin/python benchmarks/constrained_decoding.py [--rows 16] [--targets 40] [--libs llguidance,xgrammar,outlines-core,lm-format-enforcer]

For each library installed (xgrammar, llguidance, outlines-core, lm-format-enforcer), with the bundled
SmolLM2-135M-Instruct tokenizer (49k tokens) and a tiny byte-level BPE trained here on the phee-ade
texts (~500 tokens):
  - tokenizer set-up: the library's view of the vocabulary (once per tokenizer, cacheable);
  - compile: the grammar for the phee-ade extract schema (`ExtractTask.answer_schema()`), cold, in a
    fresh process (a library-level cache would otherwise hide it); the figure is one process's;
  - mask per step: 16 rows decode at once, each following its own gold answer token by token (so rows sit in
    different grammar states); one step = fill every row's allowed-token mask + apply the masks to a
    [16, vocab] float32 logits tensor + advance every row by its token; median over all steps;
  - correctness: every gold answer of the phee-ade test split (as the training target, `json.dumps`
    form, tokenised by the tokenizer) is accepted token by token and may end there (end-of-turn allowed);
    four invalid answers per gold one (the last key missing, an unknown key, a number value, a nested object)
    are refused before their end.
Prints a Markdown table (paste into BENCHMARKS.md). One run takes ~1–3 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
LIBS = ["llguidance", "xgrammar", "outlines-core", "lm-format-enforcer"]
SEPARATORS = (", ", ": ")  # json.dumps' defaults: the form extract's training targets have


def _task() -> Any:
    from microtune.config import load_recipe
    from microtune.tasks import get_task

    return get_task(load_recipe(ROOT / "recipes" / "phee-ade.yaml").task, [])


def _targets(task: Any, n: int) -> list[str]:
    rows = [json.loads(line) for line in (ROOT / "recipes/data/phee-ade/test.jsonl").read_text().splitlines()[:n]]
    return [json.dumps({f: r["target"].get(f) for f in task.fields}, ensure_ascii=False) for r in rows]


def _invalid(task: Any, good: str) -> list[str]:
    obj = json.loads(good)
    fields = task.fields
    missing = {k: v for k, v in obj.items() if k != fields[-1]}
    extra = obj | {"note": "x"}
    number = {**obj, fields[0]: 3}
    nested = {**obj, fields[0]: {"a": "b"}}
    return [json.dumps(x) for x in (missing, extra, number, nested)]


def smollm2_tokenizer() -> Any:
    from microtune.config import ModelConfig
    from microtune.models import load_tokenizer, resolve_base

    return load_tokenizer(resolve_base(ModelConfig()))


def tiny_tokenizer(texts: list[str]) -> Any:
    """A byte-level BPE of ~500 tokens trained on the given texts, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def _byte_vocab(tok: Any) -> dict[int, bytes]:
    """Token id → the bytes it stands for (byte-level BPE), special tokens left out."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):  # GPT-2's byte → printable character table
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b], extra = chr(256 + extra), extra + 1
    inverse = {c: b for b, c in chars.items()}
    special = set(tok.all_special_ids)
    out = {}
    for piece, i in tok.get_vocab().items():
        if i not in special and all(c in inverse for c in piece):
            out[i] = bytes(inverse[c] for c in piece)
    return out


class Adapter:
    """One library behind the same four calls: setup(tokenizer), compile(schema), rows(n), and per row fill/advance."""

    name = ""

    def setup(self, tok: Any) -> None: ...

    def compile(self, schema: dict[str, Any]) -> Any: ...

    def matcher(self, compiled: Any) -> Any: ...

    def fill(self, matchers: list[Any], logits: torch.Tensor, history: list[list[int]]) -> None:
        """Mask every row's logits in place (disallowed → -inf)."""

    def advance(self, m: Any, token: int) -> bool: ...

    def may_end(self, m: Any, history: list[int]) -> bool:
        """Whether the end-of-turn token is allowed now."""


class Llguidance(Adapter):
    name = "llguidance"

    def setup(self, tok: Any) -> None:
        import llguidance.hf

        self.tok, self.eot = llguidance.hf.from_tokenizer(tok, n_vocab=len(tok), eos_token=tok.eos_token_id), tok.eos_token_id
        self.vocab = len(tok)

    def compile(self, schema: dict[str, Any]) -> Any:
        import llguidance

        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False, "item_separator": SEPARATORS[0], "key_separator": SEPARATORS[1]})
        llguidance.LLMatcher(self.tok, grammar)  # building the first matcher compiles the lexer
        return grammar

    def matcher(self, compiled: Any) -> Any:
        import llguidance

        m = llguidance.LLMatcher(self.tok, compiled, log_level=0)
        assert not m.is_error(), m.get_error()
        return m

    def fill(self, matchers: list[Any], logits: torch.Tensor, history: list[list[int]]) -> None:
        import llguidance.torch as lt

        mask = lt.allocate_token_bitmask(len(matchers), self.vocab)
        for i, m in enumerate(matchers):
            lt.fill_next_token_bitmask(m, mask, i)
        lt.apply_token_bitmask_inplace(logits, mask)

    def advance(self, m: Any, token: int) -> bool:
        return m.consume_token(token) and not m.is_error()

    def may_end(self, m: Any, history: list[int]) -> bool:
        return m.is_accepting()


class Xgrammar(Adapter):
    name = "xgrammar"

    def setup(self, tok: Any) -> None:
        import xgrammar as xg

        self.info = xg.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok), stop_token_ids=[tok.eos_token_id])
        self.compiler = xg.GrammarCompiler(self.info, cache_enabled=False)
        self.vocab = len(tok)

    def compile(self, schema: dict[str, Any]) -> Any:
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=SEPARATORS)

    def matcher(self, compiled: Any) -> Any:
        import xgrammar as xg

        return xg.GrammarMatcher(compiled)

    def fill(self, matchers: list[Any], logits: torch.Tensor, history: list[list[int]]) -> None:
        import xgrammar as xg

        mask = xg.allocate_token_bitmask(len(matchers), self.vocab)
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(mask, i)
        xg.apply_token_bitmask_inplace(logits, mask)

    def advance(self, m: Any, token: int) -> bool:
        return m.accept_token(token)

    def may_end(self, m: Any, history: list[int]) -> bool:
        return m.is_completed()


class OutlinesCore(Adapter):
    name = "outlines-core"

    def setup(self, tok: Any) -> None:
        from outlines_core import Vocabulary

        grouped: dict[bytes, list[int]] = {}
        for i, b in _byte_vocab(tok).items():
            grouped.setdefault(b, []).append(i)
        self.vocabulary = Vocabulary(tok.eos_token_id, grouped)
        self.eot, self.vocab = tok.eos_token_id, len(tok)

    def compile(self, schema: dict[str, Any]) -> Any:
        from outlines_core import Index
        from outlines_core.json_schema import build_regex_from_schema

        return Index(build_regex_from_schema(json.dumps(schema), whitespace_pattern="[ ]?"), self.vocabulary)

    def matcher(self, compiled: Any) -> Any:
        from outlines_core import Guide

        return Guide(compiled)

    def fill(self, matchers: list[Any], logits: torch.Tensor, history: list[list[int]]) -> None:
        from outlines_core.kernels.torch import allocate_token_bitmask, apply_token_bitmask_inplace, fill_next_token_bitmask

        for i, m in enumerate(matchers):
            mask = allocate_token_bitmask(logits.shape[1])
            fill_next_token_bitmask(m, mask)
            apply_token_bitmask_inplace(logits[i:i + 1], mask)

    def advance(self, m: Any, token: int) -> bool:
        try:
            m.advance(token)
        except Exception:  # noqa: BLE001 (refused token)
            return False
        return True

    def may_end(self, m: Any, history: list[int]) -> bool:
        return self.eot in m.get_tokens()


class LmFormatEnforcer(Adapter):
    name = "lm-format-enforcer"

    def setup(self, tok: Any) -> None:
        from lmformatenforcer.integrations.transformers import build_token_enforcer_tokenizer_data

        self.data, self.eot, self.vocab = build_token_enforcer_tokenizer_data(tok), tok.eos_token_id, len(tok)

    def compile(self, schema: dict[str, Any]) -> Any:
        from lmformatenforcer import JsonSchemaParser

        return JsonSchemaParser(schema)

    def matcher(self, compiled: Any) -> Any:
        from lmformatenforcer import TokenEnforcer

        return TokenEnforcer(self.data, compiled)

    def fill(self, matchers: list[Any], logits: torch.Tensor, history: list[list[int]]) -> None:
        for i, m in enumerate(matchers):
            allowed = torch.tensor(list(m.get_allowed_tokens(history[i])))
            keep = logits[i, allowed].clone()
            logits[i].fill_(float("-inf"))
            logits[i, allowed] = keep

    def advance(self, m: Any, token: int) -> bool:
        return True  # stateless: the history is passed to fill

    def may_end(self, m: Any, history: list[int]) -> bool:
        return self.eot in list(m.get_allowed_tokens(history))


ADAPTERS = {a.name: a for a in (Llguidance, Xgrammar, OutlinesCore, LmFormatEnforcer)}


def walk(adapter: Adapter, compiled: Any, token_rows: list[list[int]]) -> tuple[list[bool], list[float]]:
    """Rows advance together along their token lists; returns (row accepted to the end and may end there, step seconds)."""
    matchers = [adapter.matcher(compiled) for _ in token_rows]
    ok = [True] * len(token_rows)
    history: list[list[int]] = [[] for _ in token_rows]
    steps = []
    for step in range(max(len(t) for t in token_rows)):
        live = [i for i, t in enumerate(token_rows) if step < len(t) and ok[i]]
        if not live:
            break
        logits = torch.randn(len(live), adapter.vocab)
        start = time.perf_counter()
        adapter.fill([matchers[i] for i in live], logits, [history[i] for i in live])
        for j, i in enumerate(live):
            tok = token_rows[i][step]
            allowed = bool(torch.isfinite(logits[j, tok]))
            ok[i] = allowed and adapter.advance(matchers[i], tok)
            history[i].append(tok)
        steps.append(time.perf_counter() - start)
    ends = [ok[i] and adapter.may_end(matchers[i], history[i]) for i in range(len(token_rows))]
    return ends, steps


def measure(lib: str, which: str, rows: int, n_targets: int) -> dict[str, Any]:
    task = _task()
    targets = _targets(task, n_targets)
    train = (ROOT / "recipes/data/phee-ade/train.jsonl").read_text().splitlines()
    tok = smollm2_tokenizer() if which == "SmolLM2" else tiny_tokenizer([*targets, *(json.loads(line)["text"] for line in train)])
    adapter = ADAPTERS[lib]()
    t0 = time.perf_counter()
    adapter.setup(tok)
    t1 = time.perf_counter()
    compiled = adapter.compile(task.answer_schema())
    t2 = time.perf_counter()
    good = [tok(t, add_special_tokens=False)["input_ids"] for t in targets]
    accepted, steps = walk(adapter, compiled, (good * ((rows + len(good) - 1) // len(good)))[:max(rows, len(good))])
    bad = [tok(b, add_special_tokens=False)["input_ids"] for t in targets[:10] for b in _invalid(task, t)]
    refused, _ = walk(adapter, compiled, bad)
    timed, step_times = walk(adapter, compiled, good[:rows])
    return {"lib": lib, "tokenizer": f"{which} ({len(tok)} tokens)", "setup_s": t1 - t0, "compile_s": t2 - t1,
            "mask_ms": statistics.median(step_times) * 1000, "gold_accepted": f"{sum(accepted)}/{len(accepted)}",
            "invalid_refused": f"{sum(not r for r in refused)}/{len(refused)}"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--targets", type=int, default=40)
    p.add_argument("--libs", default=",".join(LIBS))
    p.add_argument("--one", nargs=2, metavar=("LIB", "TOKENIZER"), help=argparse.SUPPRESS)  # the child process
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.one:
        print(json.dumps(measure(args.one[0], args.one[1], args.rows, args.targets)))
        return
    results = []
    for lib in args.libs.split(","):
        for which in ("tiny", "SmolLM2"):
            cmd = [sys.executable, __file__, "--rows", str(args.rows), "--targets", str(args.targets), "--one", lib, which]
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() else None
            results.append(json.loads(line) if line else {"lib": lib, "tokenizer": which, "error": (out.stderr.strip().splitlines() or ["?"])[-1]})
            print(results[-1], file=sys.stderr, flush=True)
    print("| library | tokenizer | tokenizer set-up s | schema compile s | mask + apply, 16 rows, ms/step (median) "
          "| gold answers accepted | invalid answers refused |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        if "error" in r:
            print(f"| {r['lib']} | {r['tokenizer']} | failed: {r['error'][:80]} | | | | |")
        else:
            print(f"| {r['lib']} | {r['tokenizer']} | {r['setup_s']:.2f} | {r['compile_s']:.3f} | {r['mask_ms']:.2f} | "
                  f"{r['gold_accepted']} | {r['invalid_refused']} |")


if __name__ == "__main__":
    main()
