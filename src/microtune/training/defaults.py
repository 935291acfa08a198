"""Training settings chosen from the data: what `train.epochs`, `train.lr` and `train.batch_size` become when a recipe
leaves them out (or writes `auto`); and `train.gradient_checkpointing`, chosen by the method kind.

    recipe, chosen = data_defaults(recipe, stats)     # stats: the check step's dataset statistics
    chosen["train.epochs"]                            # Choice(value=8.0, why="300 train rows, 38 steps a pass: 8 passes ≈ 304 steps ...")

The rule, and the tuning runs it was derived from, are in docs/training.md ("Defaults from the data"):

- **batch size**: 8 examples; halved while 8 rows of the 90th-percentile length would exceed ``BATCH_TOKENS`` (long
  rows: less memory, no slower per token), and 4 below ``SMALL_DATA`` rows (more optimizer steps from few examples).
- **epochs**: the whole number of passes over the train rows (real and synthetic) closest to ``TARGET_STEPS``
  optimizer steps, within ``EPOCHS``. In the tuning runs 300 steps beat 190 and 225 (clinc150-oos, banking-intents);
  `train.keep_best` keeps the best validation's weights, so a few passes too many cost time, not accuracy.
- **learning rate**: by the method kind, from ``LR``.
- **gradient checkpointing**: on for a method with a 4-bit base (qlora), off otherwise (``checkpointing``).

An explicit value in the recipe (or ``--set``) is always kept; the chosen values are what the run's `recipe.json`,
its MLflow parameters and ``microtune check`` show.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import microtune.methods as methods
from microtune.config import Recipe

AUTO = "auto"
TARGET_STEPS = 300  # optimizer steps the epochs aim at
EPOCHS = (2, 10)  # the passes auto epochs stay within
BATCH = 8  # examples per micro-batch, before the length and size rules
BATCH_TOKENS = 2048  # a micro-batch of p90-length rows above this is halved
SMALL_DATA = 100  # fewer train rows than this: batch 4
# by method family ("lora" also covers qlora and dora): the best of each family's grid on 150 banking rows (lora, ia3,
# prompt); prefix and full were not measured here: prefix tuning takes prompt tuning's lower, steadier rate, full
# fine-tuning the 2e-5 usual for models of this size (every weight moves: ~25× below LoRA's)
LR = {"lora": 5e-4, "ia3": 2e-2, "prompt": 1e-1, "prefix": 3e-2, "full": 2e-5}


@dataclass(frozen=True)
class Choice:
    value: Any
    why: str


def data_defaults(recipe: Recipe, stats: dict[str, Any], extra_rows: int = 0) -> tuple[Recipe, dict[str, Choice]]:
    """The recipe with its `auto` epochs / lr / batch size replaced by values chosen from ``stats`` (the check step's
    dataset statistics: train rows, token lengths) and ``extra_rows`` (synthetic rows mixed into train), and what was
    chosen with the reason, by recipe path. A recipe without `auto` settings comes back unchanged."""
    cfg, chosen = recipe.train, {}
    rows = int(stats["rows"]["train"]) + extra_rows
    p90 = int((stats.get("train_tokens") or {}).get("p90", 0))
    batch = cfg.batch_size
    if batch == AUTO:
        batch, why = _batch(rows, min(p90, cfg.max_seq_len))
        chosen["train.batch_size"] = Choice(batch, why)
    if cfg.epochs == AUTO:
        per_epoch = max(1, math.ceil(rows / (batch * cfg.grad_accum)))
        epochs = float(min(EPOCHS[1], max(EPOCHS[0], round(TARGET_STEPS / per_epoch))))  # the field's type: a float
        note = " (max_steps is set: it decides the length)" if cfg.max_steps else ""
        chosen["train.epochs"] = Choice(epochs, f"{rows} train rows, {per_epoch} steps a pass: {epochs:g} passes ≈ "
                                                f"{epochs * per_epoch:.0f} steps (aim {TARGET_STEPS}, {EPOCHS[0]}–{EPOCHS[1]} passes){note}")
    if cfg.lr == AUTO:
        family = lr_family(recipe.method.kind)
        chosen["train.lr"] = Choice(LR[family], f"method {recipe.method.kind}: the {family} family's rate")
    if cfg.gradient_checkpointing == AUTO and checkpointing(recipe.method.kind).value:  # shown where it turns on; `auto` is off
        chosen["train.gradient_checkpointing"] = checkpointing(recipe.method.kind)  # elsewhere (``uses_checkpointing``)
    if not chosen:
        return recipe, chosen
    train = cfg.model_copy(update={path.split(".", 1)[1]: c.value for path, c in chosen.items()})
    return recipe.model_copy(update={"train": train}), chosen


def _batch(rows: int, p90: int) -> tuple[int, str]:
    if rows < SMALL_DATA:
        return BATCH // 2, f"{rows} train rows (< {SMALL_DATA}): a smaller batch for more steps"
    batch = BATCH
    while batch > 1 and batch * p90 > BATCH_TOKENS:
        batch //= 2
    if batch == BATCH:
        return batch, f"{rows} train rows of ≤ {p90} tokens (p90)"
    return batch, f"rows of {p90} tokens (p90): {batch} of them stay within {BATCH_TOKENS} tokens a batch"


def lr_family(kind: str) -> str:
    """The learning-rate family of a method kind: full fine-tuning, prompt or prefix tuning, IA3, or LoRA-like (the rest)."""
    if methods.has(kind, "full_model"):
        return "full"
    if methods.has(kind, "prompt_learning"):
        return "prefix" if "prefix" in kind else "prompt"
    return "ia3" if "ia3" in kind else "lora"


def checkpointing(kind: str) -> Choice:
    """What `train.gradient_checkpointing: auto` becomes for a method kind: on where the base is quantised (the user chose
    memory over speed), off elsewhere (speed first)."""
    if methods.has(kind, "quantized_base"):
        return Choice(True, f"method {kind}: a 4-bit base is chosen to save memory; recomputing activations in backward "
                            "cut a 1.7B model's peak at 512 tokens to 0.69×, 40% slower a step (BENCHMARKS.md)")
    return Choice(False, f"method {kind}: activations kept for backward (faster); true trades 30–40% speed for memory")


def uses_checkpointing(recipe: Recipe) -> bool:
    """`train.gradient_checkpointing` as a run uses it (`auto` resolved by the method kind)."""
    setting = recipe.train.gradient_checkpointing
    return checkpointing(recipe.method.kind).value if setting == AUTO else bool(setting)


def unresolved(recipe: Recipe) -> list[str]:
    """Training settings still `auto` (a recipe that did not go through the check step)."""
    cfg = recipe.train
    return [f"train.{n}" for n in ("epochs", "lr", "batch_size") if getattr(cfg, n) == AUTO]
