"""Everything a run needs before its first step: encoded data, the model in its process layout, optimizer, plan.

    run = set_up(recipe, ref, DataSource(dataset_dir, labels), Resume(checkpoint_dir, resume=True))

The steps themselves are in training/loop.py; ``Run`` is what they share.
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import microtune.methods as methods
from microtune.config import Recipe
from microtune.core.errors import RecipeError
from microtune.data import read_split
from microtune.data.balance import label_weights, resolve_balance
from microtune.models import BaseModelRef, MethodContext, apply_method, load_model, load_tokenizer, quantization_config, short_attention
from microtune.models.hardware import autocast_linears, device, precast_frozen_linears, seed_everything, use_bf16, weights_dtype
from microtune.models.resolve import stored_dtypes
from microtune.tasks import get_task
from microtune.tasks.render import Encoded as Example
from microtune.tasks.render import Renderer, encode_example
from microtune.training import distributed as dist
from microtune.training.batching import batches_per_epoch
from microtune.training.checkpoint import latest_checkpoint, load_checkpoint
from microtune.training.defaults import data_defaults, unresolved, uses_checkpointing
from microtune.training.fuse import fuse_siblings
from microtune.training.state import Clock, TrainState
from microtune.training.strategy import Single, pick

log = logging.getLogger(__name__)
BUCKET_WINDOW = 50  # batches per length-sorting window when train.length_bucketing is on
Encoded = list[Example]  # (prompt_ids, completion_ids), or a conversation's (prompt_ids, completion_ids, labels), per example


@dataclass(frozen=True)
class DataSource:
    """Where the rows come from: a dataset artifact's splits, plus ``extra_train`` rows (synthetic, picked by the pipeline)."""

    dataset_dir: Path
    labels: list[str]
    extra_train: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class Resume:
    """Checkpoints: where they go (``None``: none written), whether to continue from the newest, and the run's identifiers."""

    checkpoint_dir: Path | None = None
    resume: bool = False
    run_meta: dict[str, Any] | None = None


@dataclass
class Data:
    train: Encoded
    valid: Encoded
    balance: str  # the resolved train.balance: none | sample | weight
    weights: list[float] | None  # per train example (balance sample or weight), else None
    pad: int


@dataclass(frozen=True)
class Plan:
    total_micro: int  # micro-batches of the whole run
    steps: int  # optimizer steps
    eval_every: int  # optimizer steps between validations
    window: int  # batches per length-sorting window (1: random batches)


@dataclass
class Run:
    """A run in progress: set up once, advanced by ``loop.step`` / ``loop.after_step``."""

    recipe: Recipe
    tokenizer: Any
    data: Data
    plan: Plan
    model: Any
    strategy: Single
    optimizer: Any
    scheduler: Any
    state: TrainState
    best: dict[str, Any] | None  # trainable weights at the lowest validation loss (train.keep_best)
    bf16: bool
    resume: Resume
    clock: Clock = field(default_factory=Clock)
    scaler: Any = None  # torch.amp.GradScaler: enabled only for float16 weights, a no-op pass-through otherwise

    @property
    def cfg(self) -> Any:
        return self.recipe.train

    @property
    def trainable(self) -> list[Any]:
        return [p for p in self.model.parameters() if p.requires_grad]


def set_up(recipe: Recipe, ref: BaseModelRef, source: DataSource, resume: Resume) -> Run:
    """Check, encode, build, plan, and restore the newest checkpoint when resuming; the model is left in train mode."""
    dist.init()
    seed_everything(recipe.train.seed)
    tokenizer = load_tokenizer(ref)
    data = encode(recipe, tokenizer, source)
    recipe = _choose_auto(recipe, data)
    cfg = recipe.train
    _refuse(recipe)
    strategy = pick(cfg)
    model = build_model(recipe, ref, to_device=not strategy.places_model, autocast=True)
    precast(recipe, model, to_device=not strategy.places_model)
    if cfg.fuse_siblings and not strategy.places_model and not uses_checkpointing(recipe):
        fuse_siblings(model)
    strategy.wrap(model, cfg)
    plan = make_plan(cfg, [len(p) + len(c) for p, c, *_ in data.train])
    optimizer, scheduler = _optimizer(model, cfg, plan.steps)
    scaler = grad_scaler(model)
    state, best = _restore(resume, model, optimizer, scheduler, scaler)
    model.train()
    return Run(recipe, tokenizer, data, plan, model, strategy, optimizer, scheduler, state, best, use_bf16(cfg.bf16), resume,
               Clock(state.elapsed), scaler)


def _choose_auto(recipe: Recipe, data: Data) -> Recipe:
    """`auto` training settings still open (a caller that skipped the check step, which chooses them: ``train_adapter``
    called directly) chosen by the same rule from the encoded train rows."""
    if not unresolved(recipe):
        return recipe
    lengths = sorted(len(p) + len(c) for p, c, *_ in data.train)
    p90 = lengths[min(len(lengths) - 1, int(0.9 * len(lengths)))] if lengths else 0
    return data_defaults(recipe, {"rows": {"train": len(lengths)}, "train_tokens": {"p90": p90}})[0]


def _refuse(recipe: Recipe) -> None:
    """Settings this run cannot train with (method-vs-option rules are the recipe's, checked when it loads; the process
    group, torchrun's, is joined first to know how many ranks there are)."""
    cfg = recipe.train
    if cfg.batch_size < dist.world_size():
        raise RecipeError(f"train.batch_size {cfg.batch_size} is smaller than the {dist.world_size()} processes",
                          hint="the batch is split across processes: use a batch_size of at least --nproc")


def encode(recipe: Recipe, tokenizer: Any, source: DataSource) -> Data:
    """Token ids of the train (real + extra rows) and valid splits, and the class balancing they get."""
    cfg = recipe.train
    renderer, task = Renderer(tokenizer), get_task(recipe.task, source.labels)
    rows = read_split(source.dataset_dir, "train") + list(source.extra_train or [])
    train = encode_split(rows, task, renderer, cfg.max_seq_len)
    valid = encode_split(read_split(source.dataset_dir, "valid"), task, renderer, cfg.max_seq_len)
    balance = resolve_balance(cfg.balance, [r.get("label") for r in rows])
    weights = label_weights([r["label"] for r in rows], cfg.balance_power) if balance != "none" else None
    return Data(train, valid, balance, weights, tokenizer.pad_token_id)


def encode_split(rows: list[dict[str, Any]], task: Any, renderer: Renderer, max_len: int) -> Encoded:
    return [encode_example(task, r, renderer, max_len) for r in rows]


def build_model(recipe: Recipe, ref: BaseModelRef, to_device: bool = True, autocast: bool = False) -> Any:
    """The base model with the recipe's method applied; ``to_device=False`` leaves placing it to the layout (FSDP
    moves each layer's shard to the device as it shards it; a 4-bit base is placed by its loader). The weights load in
    ``model.dtype`` (``auto``: fp32 on a CPU and for ``full``, bf16/fp16 on a GPU); adapter weights are fp32 either way.

    ``autocast``: the caller runs every forward under bf16 autocast and holds the frozen linear weights in bf16 (``precast``,
    the engine). A checkpoint stored in bf16 then loads as stored, and everything but those linear weights is widened to
    fp32 (``_bf16_as_stored``): the base weights of the fp32 load rounded by ``precast``, without first holding every
    weight in fp32. PEFT creates the adapter in its base layer's dtype and widens it, so LoRA's initial A matrix is
    rounded to bf16, as on any bf16 base. Not for DoRA, whose initial magnitudes are norms of its base layers (fp32)."""
    weights = weights_dtype(recipe.model.dtype, trains_base=methods.has(recipe.method.kind, "full_model"))
    quant = quantization_config(recipe.method, weights)
    as_stored = (autocast and to_device and _precasts(recipe) and recipe.method.kind != "dora" and quant is None
                 and stored_dtypes(ref) == {"BF16"})
    model = load_model(ref, recipe.model.trust_remote_code, quant, dtype="bfloat16" if as_stored else weights,
                       attention=recipe.model.attention, flash_ok=not recipe.train.packing,
                       quantized_cache=recipe.model.quantized_cache)
    model.config.use_cache = False
    if weights == "bfloat16" and recipe.model.dtype == "bfloat16" and methods.has(recipe.method.kind, "full_model"):
        log.warning("model.dtype=bfloat16 with method %s: the trained weights are bf16 themselves, so AdamW updates smaller "
                    "than a weight's precision are lost; model.dtype: auto keeps fp32 master weights", recipe.method.kind)
    if quant is None and to_device:
        model = model.to(device())
    model = apply_method(model, recipe.method, MethodContext(recipe.train.seed, recipe.task.instruction, ref.path))
    if as_stored:
        _bf16_as_stored(model)
    if recipe.model.attention == "auto" and device() == "cpu":
        short_attention.use(model.get_base_model() if hasattr(model, "get_base_model") else model)
    if uses_checkpointing(recipe):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _precasts(recipe: Recipe) -> bool:
    # QLoRA too: its 4-bit layers are not fp32 linears, but its LM head is (bf16 once instead of a cast every forward)
    adapter = not methods.has(recipe.method.kind, "full_model")
    return precast_frozen_linears(recipe.model.dtype, use_bf16(recipe.train.bf16), adapter)


def _bf16_as_stored(model: Any) -> int:
    """Widen to fp32 every bf16 parameter but those of ``autocast_linears`` (embeddings, norms; the input embeddings even
    where an LM head is tied to them: the head keeps the bf16 tensor). bf16 → fp32 is exact, so the base holds the values
    an fp32 load followed by ``precast`` holds; returns how many tensors were widened."""
    import torch

    held = {id(m) for m in autocast_linears(model, any_dtype=True)}
    widened = 0
    for module in model.modules():
        if id(module) in held:
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            if param.dtype == torch.bfloat16:
                setattr(module, name, torch.nn.Parameter(param.detach().float(), requires_grad=param.requires_grad))
                widened += 1
    return widened


def precast(recipe: Recipe, model: Any, to_device: bool = True) -> int:
    """The engine's bf16 frozen linears where ``models.hardware.precast_frozen_linears`` says so; returns how many layers.
    Here, not in ``build_model``: every forward of the engine runs under bf16 autocast, which bf16 weights need (a caller
    of ``build_model`` may run the model without it)."""
    quantized = methods.has(recipe.method.kind, "quantized_base")
    cast = 0
    if to_device and _precasts(recipe):
        cast = frozen_linears_to_bf16(model)
    if cast or quantized:
        own_frozen_weights(model, skip=autocast_linears(model) if cast else [])
    return cast


def own_frozen_weights(model: Any, skip: list[Any]) -> int:
    """Copy the frozen floating-point weights that training keeps as loaded (embeddings, norms) into the process's own
    memory; returns how many tensors. The loader maps the weight file into memory and its tensors are views of that
    map, which stays resident while any one of them lives: after the linear weights are cast to bf16 (or quantized
    to 4-bit) the file's pages of the fp32 originals stayed resident too, −405 MiB peak RSS on SmolLM2-135M once
    dropped (BENCHMARKS.md, training levers). Only the tensors still on a CPU, not those of the ``skip`` modules (their
    weights are fresh copies already: the bf16 cast); trained weights (``full``) are left."""
    fresh = {id(p) for module in skip for p in module.parameters(recurse=False)}
    owned = 0
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point() and param.device.type == "cpu" and id(param) not in fresh:
            param.data = param.data.clone()
            owned += 1
    return owned


def frozen_linears_to_bf16(model: Any) -> int:
    """Round ``models.hardware.autocast_linears``' weights (and biases) to bf16 once, as bf16 autocast would every forward;
    returns how many layers. An LM head tied to the input embeddings gets its own bf16 copy (+2 bytes per embedding
    weight, the size of the copy autocast made every forward and kept for backward) and the embedding lookup keeps the
    fp32 tensor. Not with FSDP (``to_device`` false): its flat shards take one dtype. Rule and reasons:
    ``models.hardware.precast_frozen_linears``."""
    import torch

    layers = autocast_linears(model)
    for module in layers:
        for name, param in list(module.named_parameters(recurse=False)):  # a new tensor: a tied LM head gets its own copy
            setattr(module, name, torch.nn.Parameter(param.detach().to(torch.bfloat16), requires_grad=False))
    return len(layers)


def make_plan(cfg: Any, lengths: list[int]) -> Plan:
    """Micro-batches and steps of the run: ``train.max_steps`` when set, else ``train.epochs`` passes."""
    window = BUCKET_WINDOW if cfg.length_bucketing else 1
    per_epoch = batches_per_epoch(len(lengths), cfg.batch_size, window)
    total_micro = cfg.max_steps * cfg.grad_accum if cfg.max_steps else max(1, round(per_epoch * cfg.epochs))
    eval_every = cfg.eval_steps or max(1, round(per_epoch / cfg.grad_accum))
    return Plan(total_micro, math.ceil(total_micro / cfg.grad_accum), eval_every, window)


def _optimizer(model: Any, cfg: Any, steps: int) -> tuple[Any, Any]:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    half = any(p.dtype == torch.float16 for p in model.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=None if half else _fused(params))
    warmup = int(steps * cfg.warmup_ratio)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, warmup=warmup, steps=steps))


def lr_factor(step: int, warmup: int, steps: int) -> float:
    """The learning rate's share at optimizer step ``step`` (0-based): a linear warm-up over ``warmup`` steps that starts
    above 0 — (step + 1) / (warmup + 1), so no step is spent at lr 0 (transformers' linear warm-up gives step 0 a rate of
    0: in a one-epoch run of 240 rows that is one step of 30 lost, BENCHMARKS.md 'Training') — then a linear decay
    from 1 at step ``warmup`` towards 0 after the last step."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(0.0, (steps - step) / max(1, steps - warmup))


def _fused(params: list[Any]) -> bool | None:
    """AdamW's fused kernel (one pass over every tensor instead of a Python loop over hundreds of small LoRA matrices: 3×
    faster on a CPU, benchmarks/train_speed.py) where it surely runs: plain fp32/bf16 parameters on a CPU or CUDA device (not
    FSDP's flat or sharded ones), and not beside fp16 weights' loss scaling (the caller); ``None`` leaves torch its default."""
    import torch

    ok = params and all(type(p) is torch.nn.Parameter and p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16)
                        for p in params)
    return True if ok else None


def grad_scaler(model: Any) -> Any:
    """Loss scaling for float16 weights (``model.dtype: float16``, or ``auto`` on a GPU without bf16): activations and their
    gradients flow through the frozen fp16 base, where small gradients underflow to zero unless the loss is scaled up
    first. Disabled (every call a pass-through: the step is exactly the unscaled one) for fp32 and bf16 weights."""
    import torch

    half = any(p.dtype == torch.float16 for p in model.parameters())
    return torch.amp.GradScaler(device(), enabled=half)


def _restore(resume: Resume, model: Any, optimizer: Any, scheduler: Any, scaler: Any = None) -> tuple[TrainState, dict[str, Any] | None]:
    """A fresh state, or the newest checkpoint's state and best weights (model, optimizer, scheduler, RNG restored)."""
    meta = dict(resume.run_meta or {})
    if resume.resume and resume.checkpoint_dir and (ckpt := latest_checkpoint(resume.checkpoint_dir)):
        saved, best = load_checkpoint(ckpt, model, optimizer, scheduler, scaler)
        return TrainState.from_dict(meta | saved), best
    return TrainState(meta=meta), None
