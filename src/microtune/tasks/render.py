"""Turn chat messages into token ids through the base model's chat template.

The completion (what receives loss, and what constrained decoding chooses among) is the answer
followed by the template's end-of-turn marker, tokenised the same way in training and inference:
``answer ids + end-of-turn ids``. The end-of-turn suffix is read off the template once with a probe.
"""
from __future__ import annotations

from typing import Any

_PROBE = "\u2063PROBE\u2063"


class Renderer:
    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        self.suffix_ids = self._suffix_ids()
        self.stop_id = self.suffix_ids[-1] if self.suffix_ids else tokenizer.eos_token_id

    def _suffix_ids(self) -> list[int]:
        msgs = [{"role": "user", "content": "x"}]
        prompt = self.prompt_text(msgs)
        full = self.tok.apply_chat_template([*msgs, {"role": "assistant", "content": _PROBE}], tokenize=False)
        after = full[len(prompt):] if full.startswith(prompt) else full.split(_PROBE, 1)[-1]
        suffix = after.split(_PROBE, 1)[-1]
        ids = self.tok(suffix, add_special_tokens=False)["input_ids"]
        special = set(self.tok.all_special_ids)
        for i, tid in enumerate(ids):  # keep up to the first special token (the end-of-turn marker)
            if tid in special:
                return ids[: i + 1]
        return [self.tok.eos_token_id] if self.tok.eos_token_id is not None else []

    def prompt_text(self, messages: list[dict[str, str]]) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return self.tok(self.prompt_text(messages), add_special_tokens=False)["input_ids"]

    def completion_ids(self, answer: str) -> list[int]:
        return self.tok(answer, add_special_tokens=False)["input_ids"] + self.suffix_ids

    def encode(self, messages: list[dict[str, str]], answer: str, max_len: int) -> tuple[list[int], list[int]]:
        """``(prompt_ids, completion_ids)`` with the last user text shortened to fit ``max_len``."""
        completion = self.completion_ids(answer)
        prompt = self.prompt_ids(messages)
        overflow = len(prompt) + len(completion) - max_len
        if overflow > 0:
            text_ids = self.tok(messages[-1]["content"], add_special_tokens=False)["input_ids"]
            keep = max(len(text_ids) - overflow - 2, 1)
            short = self.tok.decode(text_ids[:keep])
            prompt = self.prompt_ids([*messages[:-1], {**messages[-1], "content": short}])[: max_len - len(completion)]
        return prompt, completion
