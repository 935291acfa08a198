"""The training loss: cross-entropy on completion tokens only, computed the fast way.

Speed choices (measured in benchmarks/): the LM head runs only at positions that carry a label, and a
prompt prefix shared by the whole batch is computed once. Both give the loss and gradients of the plain
full forward (tests/training/test_train.py), so the strategies (training/strategy.py) wrap this function as is.
"""
from __future__ import annotations

from typing import Any

from microtune.models.compat import cache_kwarg, cache_of
from microtune.training.packing import is_packed, packed_hidden_states


def _fast_path(model: Any) -> bool:
    config = getattr(model, "active_peft_config", None)
    return not getattr(config, "is_prompt_learning", False)


def shared_prefix_len(batch: dict[str, Any]) -> int:
    """Tokens every row of the batch starts with, stopping before the first completion token of any row."""
    ids, labels = batch["input_ids"], batch["labels"]
    if ids.shape[0] < 2:
        return 0
    same = (ids == ids[:1]).all(dim=0).long().cumprod(dim=0)
    first_label = int((labels != -100).long().argmax(dim=1).min())
    return max(0, min(int(same.sum()), first_label - 1))


def _hidden_states(base: Any, batch: dict[str, Any], prefix: int) -> Any:
    """Decoder hidden states; a prefix shared by all rows (system prompt, template) is computed once.

    The prefix runs as one row, its KV cache is repeated for the batch and the rows continue from it.
    Gradients flow through the repeated cache into the single prefix pass, so loss and gradients equal
    those of the full batch (tested), at the cost of the prefix once instead of once per row.
    """
    import torch

    decoder = base.get_decoder()
    if prefix < 2 or getattr(decoder, "gradient_checkpointing", False):
        return decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    ids, rows = batch["input_ids"], batch["input_ids"].shape[0]
    head = decoder(input_ids=ids[:1, :prefix], use_cache=True)
    cache = cache_of(head)
    cache.batch_repeat_interleave(rows)
    positions = torch.arange(prefix, ids.shape[1], device=ids.device).expand(rows, -1)
    tail = decoder(input_ids=ids[:, prefix:], attention_mask=batch["attention_mask"], position_ids=positions,
                   use_cache=True, **{cache_kwarg(decoder): cache})
    return torch.cat([head.last_hidden_state.expand(rows, -1, -1), tail.last_hidden_state], dim=1)


def completion_loss(model: Any, batch: dict[str, Any], share_prefix: bool = True) -> tuple[Any, float]:
    """Cross-entropy over completion tokens (weighted per example when the batch has ``weights``) and its
    normaliser (the token count, or the weight sum), which data-parallel ranks use to combine losses.

    On the fast path the LM head sees only completion positions and a prompt prefix shared by the
    batch is computed once; prompt-learning methods need PEFT's own forward (it prepends virtual
    tokens), so their logits are taken from the full output.
    """
    import torch.nn.functional as F

    targets = batch["labels"][:, 1:]
    keep = targets != -100
    if is_packed(batch):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        hidden = packed_hidden_states(base.get_decoder(), batch)
        logits = base.get_output_embeddings()(hidden[:, :-1][keep])
    elif _fast_path(model):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        hidden = _hidden_states(base, batch, shared_prefix_len(batch) if share_prefix else 0)
        logits = base.get_output_embeddings()(hidden[:, :-1][keep])
    else:
        width = batch["input_ids"].shape[1]
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, -width:][:, :-1][keep]
    ce = F.cross_entropy(logits.float(), targets[keep], reduction="none")
    if "weights" in batch:
        w = batch["weights"][:, None].expand_as(targets)[keep]
    elif "token_weights" in batch:
        w = batch["token_weights"][:, 1:][keep]
    else:
        return ce.mean(), int(keep.sum())
    return (ce * w).sum() / w.sum(), float(w.sum())
