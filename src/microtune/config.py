"""The recipe: pydantic models of a micro-model's whole job, loaded from YAML with overrides.

    recipe = load_recipe("recipes/banking-intents.yaml", ["train.epochs=2"])

Every field is typed and documented (``microtune recipe-schema`` prints them). Unknown keys are
errors that name the nearest valid key; every problem is reported at once with its YAML path and line.
Relative data paths are resolved against the recipe file's folder.
"""
from __future__ import annotations

import difflib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import (
    BaseModel,
    Discriminator,
    Field,
    GetCoreSchemaHandler,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import CoreSchema, PydanticCustomError

import microtune.methods as methods
import microtune.tasks as tasks
from microtune.core.errors import Problem, RecipeError
from microtune.core.names import NAME_PATTERN
from microtune.core.schema import Section
from microtune.methods import (  # noqa: F401 (the method sections, importable from the recipe module as before)
    DoraConfig,
    FullConfig,
    Ia3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    QloraConfig,
)
from microtune.tasks import DEFAULT_TASK, TASKS, TaskSection

log = logging.getLogger(__name__)


def _task_type(value: Any) -> str:
    """A task section without `type` is classify."""
    return value.get("type", DEFAULT_TASK) if isinstance(value, dict) else getattr(value, "type", DEFAULT_TASK)


class _RegisteredTasks:
    """The `task` section's schema: every registered task type's section, tagged by `type` (``microtune.tasks``).

    Built whenever the Recipe schema is built; ``tasks.register`` rebuilds the Recipe (``_rebuild_recipe``
    below), so a task type registered later validates like a built-in one — the same shape as `method`."""

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        tagged = tuple(Annotated[task.config, Tag(name)] for name, task in TASKS.items())
        return handler(Annotated[Union[tagged], Discriminator(_task_type)])  # noqa: UP007 (a Union built at run time)


TaskConfig = Annotated[TaskSection, _RegisteredTasks]


class SplitConfig(Section):
    valid: float = Field(0.1, ge=0, lt=1, description="Share of `train` held out for validation when `data.valid` is not given.")
    test: float = Field(0.2, ge=0, lt=1, description="Share of `train` held out for testing when `data.test` is not given.")
    seed: int = Field(13, description="Seed of the stratified split.")


class HfSource(Section):
    """Rows from Hugging Face `datasets`: a folder written by `save_to_disk`, or a dataset on the hub.

    ``{hf: data/reviews-ds, split: train}`` reads a local folder (relative to the recipe); ``{hf: owner/name, split: train,
    revision: <commit>}`` loads from the hub (online). Check hashes the rows read, so the dataset artifact changes when
    the rows do, wherever they came from."""

    hf: str = Field(..., min_length=1, description="A `save_to_disk` folder (relative to the recipe) or a hub dataset id `owner/name`.")
    split: str | None = Field(None, description="The split to read, e.g. `train`: needed for a DatasetDict folder and for a hub id.")
    revision: str | None = Field(None, min_length=1, description="Hub only: the commit (or tag) to load; pin a commit hash so a run "
                                                                 "reads the same rows again (`check` warns without one).")
    subset: str | None = Field(None, min_length=1, description="Hub only: the dataset's configuration (subset) name, when it has several.")


def _source_kind(value: Any) -> str:
    """A data source written as a mapping is a Hugging Face dataset (`{hf: ...}`); anything else is a file path."""
    return "hf" if isinstance(value, (dict, HfSource)) else "file"


DataSource = Annotated[Union[Annotated[Path, Tag("file")], Annotated[HfSource, Tag("hf")]], Discriminator(_source_kind)]  # noqa: UP007
_SOURCE_TAGS = ("file", "hf")  # pydantic puts these union tags in an error's path (data.train.hf.split): dropped when reported


class DataConfig(Section):
    train: DataSource = Field(..., description="Training data: a JSONL, CSV or Parquet file (or OpenAI chat JSONL), relative to the "
                                               "recipe, or a Hugging Face dataset `{hf: folder-or-owner/name, split: train}`.")
    valid: DataSource | None = Field(None, description="Validation data (a file or `{hf: ..., split: ...}`); omitted: split from `train`.")
    test: DataSource | None = Field(None, description="Test data (a file or `{hf: ..., split: ...}`); omitted: split from `train`.")
    format: Literal["auto", "jsonl", "csv", "openai_chat", "parquet"] = Field(
        "auto", description="File format; `auto` decides by extension (.csv/.tsv, .parquet) and by a `messages` key (OpenAI chat)."
    )
    split: SplitConfig = Field(default_factory=SplitConfig, description="Split of `train` when valid/test files are absent.")


class ModelConfig(Section):
    base: str = Field(
        "smollm2-135m-instruct",
        description="Base model: the bundled alias `smollm2-135m-instruct`, a local folder, a `.gguf` file or a hub id.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) when `base` is a hub id.")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub; off unless you trust it.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Dtype the weights load in (train, eval, and the artifact wherever it is served). `auto`: bfloat16 on a CUDA GPU that "
        "has it, float16 on an older GPU, float32 on a CPU (bf16 autocast, train.bf16, already runs the matmuls there; training an adapter "
        "under it holds the frozen linear layers' weights in bfloat16, the copy autocast would make every forward, made once: "
        "the same numbers, less time and memory) and for method full (AdamW needs fp32 master weights). Adapter weights "
        "(LoRA, DoRA, …) always train in float32."
    )
    quantized_cache: bool = Field(
        True, description="4-bit methods (qlora): keep the quantised base as a 4-bit checkpoint under $MICROTUNE_CACHE/quantized "
        "the first time and load it from there afterwards (a quarter of the full checkpoint's size to read; quantising holds "
        "the whole full-precision file in memory while it runs). false: quantise on every load."
    )
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="Attention kernel. `auto`: flash_attention_2 on a CUDA GPU with the flash_attn package and "
        "bf16/fp16 weights (not with train.packing), else transformers' default (SDPA for Llama-type models); training on a "
        "CPU runs `short_eager` (eager attention for small score matrices, faster there; SDPA beyond). "
        "flash_attention_2 where it cannot run is refused with the reason."
    )


def _method_kind(value: Any) -> str:
    """A method section without `kind` is LoRA."""
    return value.get("kind", "lora") if isinstance(value, dict) else getattr(value, "kind", "lora")


class _RegisteredMethods:
    """The `method` section's schema: every registered method's section, tagged by `kind`.

    Built from ``microtune.methods`` whenever the Recipe schema is built; ``methods.register`` rebuilds
    the Recipe (``_rebuild_recipe`` below), so a method registered later validates like a built-in one."""

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        tagged = tuple(Annotated[s.config, Tag(s.kind)] for s in methods.specs())
        return handler(Annotated[Union[tagged], Discriminator(_method_kind)])  # noqa: UP007 (a Union built at run time)


MethodConfig = Annotated[Section, _RegisteredMethods]
_RULES = "method_rules"  # pydantic error type of the cross-section rules (method-vs-option, baselines-vs-task), split per rule


@dataclass(frozen=True)
class _Needs:
    """A recipe option that only some methods can train with: it needs a capability flag (``methods.base.Capabilities``)."""

    path: tuple[str, ...]  # where the option is in the recipe
    capability: str
    used: Callable[[Any], bool]  # is the option on, given the train section?
    option: str  # how the option reads in front of the method kind
    instead: str  # the way out that keeps the method


_METHOD_NEEDS = (
    _Needs(("train", "distributed", "strategy"), "fsdp", lambda t: t.distributed.strategy == "fsdp",
           "train.distributed.strategy=fsdp does not support", "use strategy: ddp"),
    _Needs(("train", "packing"), "packing", lambda t: t.packing, "train.packing cannot be used with", "set train.packing=false"),
)


def _method_rules(kind: str | None, train: Any) -> list[tuple[tuple[str, ...], str, Any]]:
    """Every (path, message, value) of ``train`` that method ``kind`` cannot train with, plus fsdp's own limit.
    ``kind`` is None when the method section itself is invalid (its errors are reported instead)."""
    broken = [(n.path, message, reduce(getattr, n.path[1:], train)) for n in _METHOD_NEEDS
              if kind is not None and n.used(train) and (message := methods.conflict(kind, n.capability, n.option, n.instead))]
    if train.distributed.strategy == "fsdp" and train.save_steps is not None:
        broken.append((("train", "save_steps"), "train.save_steps (resumable checkpoints) is not supported with "
                       "train.distributed.strategy=fsdp yet; remove train.save_steps, or use strategy: ddp to checkpoint "
                       "and --resume", train.save_steps))
    return broken


def _precision_rules(model: Any, kind: str, train: Any) -> list[tuple[tuple[str, ...], str, Any]]:
    """``model.dtype``/``model.attention`` combinations that cannot train, whatever the machine (the machine-dependent
    refusals, flash attention without CUDA, come when the model loads: models/hardware.py)."""
    broken: list[tuple[tuple[str, ...], str, Any]] = []
    if model.attention == "flash_attention_2" and train.packing:
        broken.append((("train", "packing"), "train.packing cannot be used with model.attention=flash_attention_2: packed rows "
                       "need a block-diagonal attention mask over a shared prompt prefix held in the KV cache, which the "
                       "flash-attention kernel does not take; set train.packing=false, or model.attention: auto or sdpa", True))
    if model.dtype == "float16" and methods.has(kind, "full_model"):
        broken.append((("model", "dtype"), f"model.dtype=float16 cannot train method {kind}: the trained weights and their "
                       "gradients would be float16, which overflow without loss scaling and which AdamW cannot update "
                       "reliably; use model.dtype: auto (float32 master weights) or bfloat16", "float16"))
    return broken


def _raise_rules(broken: list[tuple[tuple[str, ...], str, Any]]) -> None:
    """Raise the cross-section rules that failed (path, message, value) as one pydantic error; ``validate_recipe``
    splits it back into one problem per path, each at its own YAML line. Nothing broken: returns None."""
    if broken:
        raise PydanticCustomError(_RULES, "{summary}", {"summary": " | ".join(m for _, m, _ in broken), "rules": [list(b) for b in broken]})


class FsdpConfig(Section):
    """FSDP2 (`torch.distributed.fsdp.fully_shard`) settings, used when `train.distributed.strategy` is `fsdp`."""

    reshard_after_forward: bool = Field(
        True, description="Free each decoder layer's gathered parameters after its forward and gather them again for "
        "backward (least memory, ZeRO-3 style); false keeps them gathered until backward (one all-gather fewer per layer)."
    )
    cpu_offload: bool = Field(
        False, description="Keep the sharded parameters, gradients and optimizer state in CPU memory and copy each layer to "
        "the GPU when it runs (FSDP2 CPUOffloadPolicy): bigger models fit, steps are slower. CUDA only."
    )


class DistributedConfig(Section):
    """How `microtune train --nproc N` splits the work across its N processes."""

    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="`ddp`: every process holds the whole model and gradients are summed across processes; `fsdp`: "
        "parameters, gradients and optimizer state are sharded across processes, one FSDP2 group per decoder layer "
        "(for models that do not fit one device). Both give the update one process gives with the same global batch."
    )
    fsdp: FsdpConfig = Field(default_factory=FsdpConfig, description="FSDP settings (only with strategy: fsdp).")

    @model_validator(mode="before")
    @classmethod
    def _known_strategy(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("strategy") == "deepspeed":
            raise ValueError("strategy 'deepspeed' is not supported by microtune; use strategy: fsdp (sharded, built in) "
                             "or run your own DeepSpeed setup through `accelerate launch`")
        return data

    @model_validator(mode="after")
    def _fsdp_only_with_fsdp(self) -> DistributedConfig:
        # defaults are fine (a resolved recipe.json spells them out); anything else would be silently ignored
        if self.strategy != "fsdp" and self.fsdp != FsdpConfig():
            raise ValueError(f"fsdp settings are given but strategy is {self.strategy!r}; set strategy: fsdp or remove fsdp")
        return self


class TrainConfig(Section):
    epochs: Annotated[float, Field(gt=0)] | Literal["auto"] = Field(
        "auto", description="Passes over the training split (ignored when max_steps is set). `auto`: from the data, the whole "
        "number of passes closest to 300 optimizer steps, 2 to 10 (the rule and its evidence: docs/training.md, \"Defaults from the data\").")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps to train; overrides epochs.")
    lr: Annotated[float, Field(gt=0, lt=1)] | Literal["auto"] = Field(
        "auto", description="Peak learning rate (linear warm-up, then linear decay). `auto`: by the method kind — 5e-4 for LoRA, "
        "QLoRA and DoRA, 2e-2 for IA3, 1e-1 for prompt tuning, 3e-2 for prefix tuning, 2e-5 for full fine-tuning (docs/training.md).")
    warmup_ratio: float = Field(
        0.05, ge=0, lt=1, description="Share of steps spent warming up: over W steps, step s runs at (s+1)/(W+1) of `lr` "
        "(none at 0), then the rate decays linearly to 0 after the last step.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="Examples per micro-batch. `auto`: 8, halved while a batch of the longest rows (p90 length) would "
        "exceed 2,048 tokens, and 4 for fewer than 100 rows (docs/training.md).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_seq_len: int = Field(256, ge=16, description="Prompt + completion tokens; longer inputs are cut at the end of the text.")
    seed: int = Field(13, description="Seed of initialisation, shuffling, sampling and dropout.")
    bf16: Literal["auto"] | bool = Field(
        "auto", description="bf16 autocast in training and prediction: `auto` where the hardware has native bf16, or true/false."
    )
    balance: Literal["auto", "none", "sample", "weight"] = Field(
        "auto",
        description="Imbalanced labels: `sample` draws examples with probability ∝ count^-balance_power, `weight` scales "
        "their loss that way, `none` trains on the data as is; `auto` = `sample` when the majority label exceeds "
        "max(50%, 2/number of labels) of train, else `none`.",
    )
    balance_power: float = Field(1.0, ge=0, le=1, description="1 = every label equally likely/weighted; 0.5 = square-root damping.")
    eval_steps: int | None = Field(None, ge=1, description="Validation loss every N optimizer steps; default: once per epoch.")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many validations without a lower validation loss; default: never stop early."
    )
    keep_best: bool = Field(True, description="Keep the weights of the lowest validation loss, not the last step's.")
    save_steps: int | None = Field(
        None, ge=1, description="Write a resumable checkpoint every N optimizer steps (`microtune train --resume`)."
    )
    length_bucketing: bool = Field(
        False,
        description="Group examples of similar length into batches (less padding) instead of random batches. Off by default: "
        "on the CLINC150 slice it cost 13 accuracy points after one epoch (label-homogeneous batches; benchmarks/train_speed.py).",
    )
    packing: bool = Field(
        False,
        description="Padding-free packing: the batch's examples end to end in rows of max_seq_len tokens, attention "
        "kept inside each example (block-diagonal mask, positions restart per example). Same loss and gradients as "
        "padded rows; pays off when example lengths vary (benchmarks/train_speed.py). Not for prompt/prefix tuning.",
    )
    gradient_checkpointing: Literal["auto"] | bool = Field(
        "auto",
        description="Recompute activations in backward: less memory, 30–40% slower. `auto`: on for a method with a 4-bit "
        "base (qlora: chosen to save memory), off otherwise.",
    )
    fuse_siblings: bool = Field(
        True,
        description="LoRA on q/k/v and on gate/up as one matmul per group (base, LoRA A, LoRA B) instead of one per layer: "
        "the same loss and gradients, faster on a CPU (training/fuse.py). Applies to lora without dropout; false: PEFT's path.",
    )
    log_every: int = Field(5, ge=1, description="Log loss to MLflow every N optimizer steps.")
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig, description="Multi-process training (`microtune train --nproc N`): ddp or fsdp."
    )


class EndpointConfig(Section):
    """An OpenAI-compatible chat endpoint evaluated as one more system (a bigger generalist: vLLM, hosted models)."""

    name: Annotated[str, Field(pattern=NAME_PATTERN)] = Field(
        ..., description="System name in the tables and the report (not zero_shot, few_shot or micro)."
    )
    base_url: str = Field(..., description="API root, e.g. http://localhost:8000/v1 or https://api.openai.com/v1.")
    model: str = Field(..., description="The `model` sent with every request.")
    api_key_env: str | None = Field(
        None, description="Environment variable holding the API key (the key itself never goes in the recipe or a log); "
        "omitted: no key (local servers)."
    )
    max_tokens: int = Field(32, ge=1, le=4096, description="Completion tokens per answer (a label is short).")
    timeout_s: float = Field(60.0, gt=0, description="Seconds before a request counts as failed.")
    usd_per_1m_input_tokens: float | None = Field(None, ge=0, description="Stated price of input tokens, for cost per 1,000 predictions.")
    usd_per_1m_output_tokens: float | None = Field(None, ge=0, description="Stated price of output tokens, for cost per 1,000 predictions.")


class EvalConfig(Section):
    baselines: list[str] = Field(
        ["zero_shot", "few_shot"], description="Baselines to compare against: `zero_shot` and `few_shot` (the base model prompted; "
        "every task), `classical` (TF-IDF + logistic regression trained on the train split; classify) and `lead` (the input's "
        "first sentence; generate). Which fit is the task type's own list: any other name is refused."
    )
    shots: int = Field(5, ge=1, le=64, description="Examples in the few-shot prompt (seeded pick from train, distinct labels first).")
    shot_selection: Literal["fixed", "similar"] = Field(
        "fixed", description="`fixed`: the same seeded shots for every test row; `similar`: per row, the `shots` train rows "
        "most similar by TF-IDF cosine (most similar last, next to the question)."
    )
    endpoints: list[EndpointConfig] = Field(
        [], description="OpenAI-compatible endpoints evaluated as extra systems (asked for the label, answer mapped to the label set)."
    )
    n_resamples: int = Field(1000, ge=100, le=100_000, description="Bootstrap resamples for the confidence intervals and paired tests.")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="Level of the percentile bootstrap intervals.")
    latency_examples: int = Field(
        20, ge=0, description="Test rows predicted one at a time (batch of 1) to measure per-example latency p50/p95; 0 = skip."
    )
    usd_per_hour: float | None = Field(
        None, gt=0, description="Price of the machine running the eval, for cost per 1,000 predictions; default: the stated "
        "table in microtune.models.prices (by GPU name, or per CPU core)."
    )
    metrics: list[str] | None = Field(
        None, description="Metrics for tables and the registry; the first is the main metric (the gate compares it). "
        "Default by task: classify accuracy, macro_f1 (multi_label: exact_match, micro_f1, macro_f1; with none_label "
        "also in_scope_accuracy, oos_recall); extract micro_f1, micro_f1_normalized, valid_rate; generate rouge_l, length_ratio "
        "(rouge_1, rouge_2 also reported; all by rouge-score, stemmed)."
    )
    batch_size: int = Field(16, ge=1, description="Examples per prediction batch.")
    max_examples: int | None = Field(None, ge=1, description="Evaluate on the first N test rows only (quick looks).")
    seed: int = Field(13, description="Seed of the few-shot pick and of the bootstrap resamples.")

    @model_validator(mode="after")
    def _endpoint_names(self) -> EvalConfig:
        names, reserved = [e.name for e in self.endpoints], [*tasks.all_baselines(), "micro"]
        taken = sorted({n for n in names if n in reserved or names.count(n) > 1})
        if taken:
            raise ValueError(f"endpoint names must be unique and differ from {', '.join(reserved)}; got {taken}")
        return self


class GateConfig(Section):
    min_gain: float = Field(0.0, ge=0, description="Least rise of the main metric (first of eval.metrics) for a challenger to win.")
    alpha: float = Field(0.05, gt=0, lt=1, description="The paired test (McNemar / paired bootstrap) must give p below this.")
    recall_drop: float = Field(
        0.10, ge=0, le=1, description="classify: most any one class's recall may fall; a larger fall rejects when it is beyond noise "
        "(the class's lost vs gained rows, one-sided exact binomial p below alpha).")
    valid_rate_drop: float = Field(0.02, ge=0, le=1, description="Most the valid-answer rate may fall.")
    latency_ratio: float = Field(1.5, ge=1, description="Most the p50 latency may grow, as a multiple of the champion's.")
    beat_classical: bool = Field(
        False, description="classify: reject a version (the first one too) whose main metric does not beat the classical "
        "baseline (TF-IDF + logistic regression on the train split) on the gate's frozen set, McNemar p below alpha. Off: the "
        "margin and its p-value are still in the decision's details.")


class WatchConfig(Section):
    inbox: Path | None = Field(None, description="Folder where new labelled JSONL/CSV files land (relative to the recipe).")
    min_new_rows: int = Field(100, ge=1, description="Trigger: at least this many new labelled rows since the last retrain.")
    new_label_min_rows: int = Field(5, ge=1, description="Trigger: a label never seen before with at least this many rows.")
    label_shift_p: float = Field(
        0.01, gt=0, lt=1, description="Trigger (label shift, with psi_threshold): chi-square test of new vs reference label counts "
        "below this p.")
    psi_threshold: float = Field(
        0.25, gt=0, description="Trigger (label shift, with label_shift_p): population stability index of the label distribution "
        "above this; both must hold — significant and large — since PSI alone on a few dozen rows is mostly noise.")
    text_drift_auc: float = Field(0.80, gt=0.5, le=1, description="Trigger: a classifier tells new from reference texts with this AUC.")
    min_rows_for_tests: int = Field(
        30, ge=5, description="Distribution, drift and champion-quality tests run only with at least this many new rows.")
    quality_floor: float | None = Field(
        None, description="Trigger: the champion's main metric (first of eval.metrics) on the new labelled rows, predicted before "
        "any retrain, below this; none: not checked (it costs one prediction pass over the new rows each cycle).")
    holdout: float = Field(0.25, ge=0, lt=1, description="Share of new rows held out (never trained on) and added to the frozen evaluation set.")
    retrain: list[str] = Field(
        ["method.kind=qlora"], description="Recipe overrides (`a.b=value`) for retraining; QLoRA by default."
    )


TrackerName = Literal["mlflow", "wandb", "tensorboard"]  # registry/trackers.py implements each; mlflow is the system of record
TRACKERS: tuple[str, ...] = get_args(TrackerName)


class WandbConfig(Section):
    """Where the W&B mirror of a run goes (only with `wandb` in tracking.backends)."""

    project: str | None = Field(None, description="W&B project; default: the recipe name.")
    entity: str | None = Field(None, description="W&B entity (user or team); default: your W&B default entity.")
    mode: Literal["online", "offline"] | None = Field(
        None, description="`online` uploads as the run goes, `offline` writes `<workspace>/wandb/offline-run-*` for `wandb sync`; "
        "default: `$WANDB_MODE`, else online. `$WANDB_MODE`, when set, wins (a CI or an air-gapped machine forces offline "
        "without editing recipes; a warning says so when the two differ).")


class TrackingConfig(Section):
    uri: str | None = Field(None, description="MLflow tracking URI; default: `$MLFLOW_TRACKING_URI`, else the workspace's SQLite store.")
    experiment: str | None = Field(None, description="MLflow experiment; default: the recipe name.")
    register_model: bool = Field(True, description="`run` registers the adapter as a model version named after the recipe.")
    backends: list[TrackerName] = Field(
        ["mlflow"], description="Where runs are tracked: `mlflow` (required: the registry, aliases, gate and lineage live there) "
        "plus mirrors of the same parameters, per-step training metrics and eval metrics: `wandb` (Weights & Biases, "
        "`<workspace>/wandb/`), `tensorboard` (`<workspace>/tensorboard/<recipe>/<MLflow run id>/`). The mirrors need "
        "`pip install 'microtune[trackers]'`; a mirror that fails is a warning, never a failed run.")
    wandb: WandbConfig = Field(default_factory=WandbConfig, description="W&B project, entity and mode (with `wandb` in backends).")

    @field_validator("backends")
    @classmethod
    def _mlflow_first(cls, backends: list[str]) -> list[str]:
        if "mlflow" not in backends:
            raise ValueError(f"tracking.backends {backends} lacks mlflow: the model registry, aliases, gate and lineage live in "
                             f"MLflow, so it is always tracked; write e.g. [mlflow, {', '.join(backends) or 'tensorboard'}]")
        twice = sorted({b for i, b in enumerate(backends) if b in backends[:i]})
        if twice:
            raise ValueError(f"tracking.backends lists {', '.join(twice)} more than once; list each once")
        return backends

    @model_validator(mode="after")
    def _wandb_only_with_wandb(self) -> TrackingConfig:
        # defaults are fine (a resolved recipe.json spells them out); anything else would be silently ignored
        if "wandb" not in self.backends and self.wandb != WandbConfig():
            raise ValueError("tracking.wandb settings are given but wandb is not in tracking.backends; add it "
                             f"(backends: {[*self.backends, 'wandb']}) or remove tracking.wandb")
        return self


class TeacherConfig(Section):
    """The model that writes synthetic examples: any OpenAI-compatible chat completions endpoint."""

    base_url: str = Field(
        "local",
        description="Endpoint ending in /v1 (vLLM, llama.cpp, Ollama, a hosted API), or `local`: the recipe's base model "
        "served by `microtune serve`.",
    )
    model: str | None = Field(None, description="Model name sent to the endpoint; required unless base_url is `local`.")
    api_key_env: str | None = Field(
        None, description="Name of the environment variable that holds the API key (the key never goes in the recipe, logs or "
        "artifacts); none: the endpoint needs no key.",
    )
    temperature: float = Field(1.0, ge=0, le=2, description="Sampling temperature of the teacher.")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling of the teacher.")
    max_tokens: int = Field(600, ge=16, description="Most tokens the teacher may write per request.")
    tune_steps: int | None = Field(
        None, ge=1, description="`local` only: first fine-tune the base model (LoRA, this many steps) to answer synth requests, on "
        "requests built from the real train rows (the fidelity holdout stays unseen), each answered with a real row of its label; "
        "then serve the merged model as the teacher, one example per request. A small base model that cannot follow the synth "
        "prompt learns its format this way (label-conditioned generation); none: the base model as it is.")
    concurrency: int = Field(8, ge=1, le=256, description="Requests in flight at once.")
    max_attempts: int = Field(
        5, ge=1, le=20, description="Tries per request (429/5xx/connection errors retry with capped exponential backoff and "
        "jitter, honouring Retry-After); after the last, the request is recorded as failed.",
    )
    timeout_s: float = Field(120, gt=0, description="Seconds to wait for one answer.")
    price_input_per_mtok: float = Field(0.0, ge=0, description="Price of a million prompt tokens (USD), for the cost report.")
    price_output_per_mtok: float = Field(0.0, ge=0, description="Price of a million completion tokens (USD), for the cost report.")

    @model_validator(mode="after")
    def _model_named(self) -> TeacherConfig:
        if self.base_url != "local" and not self.model:
            raise ValueError(f"teacher.model is required for base_url {self.base_url!r}; name the model the endpoint serves")
        return self


class SynthFilterConfig(Section):
    """The filter cascade; every reject carries its reason code."""

    length_slack: float = Field(
        0.5, ge=0, description="Keep word counts within [p5 × (1 - slack), p95 × (1 + slack)] of the real rows of the same label."
    )
    pii: bool = Field(True, description="Reject rows with e-mail addresses, phone numbers, card numbers (Luhn), IBANs or SSN-like numbers.")
    copy_threshold: float = Field(
        0.8, gt=0, le=1, description="Reject a row whose ROUGE-L F1 with any real row (train, valid or test) reaches this."
    )
    near_dup_threshold: float = Field(
        0.9, gt=0, le=1, description="Reject a row whose fuzzy similarity (rapidfuzz token-sort ratio / 100) with a kept "
        "synthetic row reaches this.",
    )
    label_check: bool | None = Field(
        None, description="Reject rows whose label a probe classifier trained on the real rows rejects. Default: on for task "
        "types with labels (classify); `true` on a task type without labels is refused."
    )
    probe_top_k: int = Field(3, ge=1, description="The probe rejects a row when its label is not among the probe's k likeliest labels.")
    judge: bool = Field(False, description="Ask the teacher endpoint whether each surviving row's label is right; reject on `no`.")
    judge_model: str | None = Field(None, description="Model for the judge; default: the teacher's model.")


class FidelityConfig(Section):
    """Tests of the synthetic rows against real rows set aside before generation."""

    holdout: float = Field(
        0.3, gt=0, lt=1, description="Share of the real train rows (per label) set aside before generation, never shown to the teacher."
    )
    max_auc: float = Field(
        0.8, ge=0.5, le=1, description="Gate: a real-vs-synthetic classifier (TF-IDF + logistic regression, cross-validated) "
        "with a higher AUC fails the synthetic set; `train` refuses to mix a failed set.",
    )
    drop_most_synthetic: float = Field(
        0.0, ge=0, lt=1, description="Share of accepted rows to drop: those the real-vs-synthetic classifier finds most synthetic."
    )
    folds: int = Field(5, ge=2, le=20, description="Cross-validation folds of the fidelity classifiers.")


class SynthMixConfig(Section):
    """How `train` uses a synthetic artifact."""

    enabled: bool = Field(False, description="`train` adds accepted synthetic rows to the real train split (real rows are never dropped).")
    max_ratio: float = Field(1.0, gt=0, description="At most this many synthetic rows per real train row (a seeded, label-stratified pick).")
    artifact: Path | None = Field(None, description="Synthetic artifact folder; default: the newest for this recipe and dataset.")
    allow_failed_gate: bool = Field(False, description="Mix a synthetic set even when it failed the fidelity gate (not advised).")


class SynthConfig(Section):
    """`microtune synth`: a teacher writes more examples; filters and fidelity tests keep them honest."""

    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="The endpoint that writes examples.")
    per_label: int | None = Field(None, ge=1, description="Accepted synthetic rows wanted per label (or give `total`).")
    total: int | None = Field(None, ge=1, description="Accepted synthetic rows wanted in all, split by `proportions`.")
    proportions: Literal["uniform", "real"] | dict[str, float] = Field(
        "uniform", description="How `total` splits over labels: evenly, like the real train split, or a {label: weight} map."
    )
    oversample: float = Field(1.5, ge=1, le=10, description="Ask for this many times the quota, since filters reject some rows.")
    examples_per_request: int = Field(5, ge=1, le=50, description="Examples the teacher writes per request (all of one label).")
    exemplars: int = Field(4, ge=0, le=32, description="Real rows of the label shown per request (rotated across requests).")
    exemplar_max_uses: int | None = Field(
        None, ge=1, description="Most requests any one real row is shown in; default: no cap beyond even rotation."
    )
    attributes: dict[str, list[str]] = Field(
        default_factory=dict, description="Scenario axes sampled per request, e.g. {flight_phase: [taxi, climb, cruise]}."
    )
    seed: int = Field(13, description="Seed of the holdout, plan, exemplar rotation and attribute sampling.")
    filters: SynthFilterConfig = Field(default_factory=SynthFilterConfig, description="The filter cascade.")
    fidelity: FidelityConfig = Field(default_factory=FidelityConfig, description="Fidelity tests against held-out real rows.")
    mix: SynthMixConfig = Field(default_factory=SynthMixConfig, description="How `train` mixes synthetic rows in.")

    @model_validator(mode="after")
    def _one_quota(self) -> SynthConfig:
        if (self.per_label is None) == (self.total is None):
            raise ValueError("give exactly one of synth.per_label or synth.total")
        if self.total is None and self.proportions != "uniform":
            raise ValueError("synth.proportions applies to synth.total; with synth.per_label every label gets the same quota")
        for axis, values in self.attributes.items():
            if not values:
                raise ValueError(f"synth.attributes.{axis} is empty; list its values or remove the axis")
        return self


class ParamRange(Section):
    """One searched setting of `tune.space`: a range (`low`, `high`; `log` for a log-uniform draw) or a list of `choices`.
    Both bounds integers: integers are drawn; else floats."""

    low: int | float | None = Field(None, description="Lowest value drawn (with `high`).")
    high: int | float | None = Field(None, description="Highest value drawn (with `low`).")
    log: bool = Field(False, description="Draw on a log scale (learning rates); needs low > 0.")
    choices: list[bool | int | float | str] | None = Field(None, description="The values to pick from (instead of low/high).")

    @model_validator(mode="after")
    def _one_form(self) -> ParamRange:
        ranged = self.low is not None or self.high is not None
        if ranged == (self.choices is not None):
            raise ValueError("give either low and high, or choices")
        if self.choices is not None:
            if not self.choices or self.log:
                raise ValueError("choices must list at least one value (and log applies to low/high only)")
            return self
        if self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"need low < high, got low={self.low} high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"log needs low > 0, got low={self.low}")
        return self

    def values(self) -> list[Any]:
        """The values that bound the search: both ends, or every choice (what `Recipe` validates against the field)."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]


class TuneConfig(Section):
    """`microtune tune`: the hyper-parameter search (Optuna TPE, hopeless trials pruned on the validation loss)."""

    space: dict[str, ParamRange | None] = Field(
        default_factory=dict, description="Searched settings by recipe path (`train.*`, `method.*`), e.g. "
        "`train.lr: {low: 1.0e-5, high: 1.0e-3, log: true}` or `method.r: {choices: [8, 16]}`; they replace the default of "
        "that path; `null` drops a default from the search.")
    defaults: bool = Field(
        True, description="Start from the method kind's default space (lr, epochs or max_steps, batch_size, LoRA r/alpha/dropout "
        "or virtual tokens, balance and balance_power for labelled tasks); false: search `space` only.")
    methods: list[str] | None = Field(
        None, description="Also search the method kind among these (each with its own default space); omitted: the recipe's method only.")
    metric: str | None = Field(
        None, description="What a trial is scored by on the valid split: a task metric (maximised; default: the main metric) "
        "or `valid_loss` (minimised).")
    pruner: Literal["median", "none"] = Field(
        "median", description="`median`: stop a trial whose validation loss is worse than the median of earlier trials at the same step.")
    startup_trials: int = Field(3, ge=0, description="Trials drawn at random before TPE models the results and before pruning starts.")
    warmup_steps: int = Field(0, ge=0, description="Optimizer steps of a trial before it may be pruned.")
    seed: int | None = Field(13, description="Seed of the sampler (each worker adds its index and the trials already in the study).")
    holdout: float = Field(
        0.0, ge=0, le=0.5, description="Share of the train rows held out of every trial's training and scored with the valid "
        "split (stratified by label, seeded by tune.seed, or 13): a larger selection set where valid is small. The tuned "
        "recipe still trains on all of train; the test split is never read.")


def _tunable(path: str, kinds: list[str]) -> tuple[list[type[BaseModel]], str]:
    """The sections that hold a `tune.space` path (the train section, or each searched method kind's) and the field name;
    no sections when the path names no searchable field."""
    section, _, name = path.partition(".")
    if section == "train" and name in TrainConfig.model_fields and name != "distributed":
        return [TrainConfig], name
    if section == "method" and name and name != "kind":
        configs = methods.configs()
        return [configs[k] for k in kinds if k in configs and name in configs[k].model_fields], name
    return [], name


def _tune_rules(tune: TuneConfig, kind: str | None) -> list[tuple[tuple[str, ...], str, Any]]:
    """Every (path, message, value) of the tune section that cannot be searched: unknown kinds, paths and out-of-range values."""
    broken: list[tuple[tuple[str, ...], str, Any]] = []
    unknown = [k for k in tune.methods or [] if k not in methods.kinds()]
    if unknown:
        broken.append((("tune", "methods"), f"unknown method kind(s) {unknown} (one of: {', '.join(methods.kinds())})", unknown))
    kinds = list(dict.fromkeys(k for k in [kind, *(tune.methods or [])] if k is not None and k not in unknown))
    for path, spec in tune.space.items():
        sections, name = _tunable(path, kinds)
        if not sections:
            broken.append((("tune", "space", path), f"{path!r} is not a searchable setting: give train.<field> or method.<field> of "
                           f"the method kind(s) {kinds} (method.kind: use tune.methods)", path))
            continue
        for section, value in dict.fromkeys((s, v) for s in sections for v in (spec.values() if spec else [])):
            try:
                section.model_validate({name: value})
            except ValidationError as exc:
                broken.append((("tune", "space", path), f"{value!r} is not a valid {path}: {exc.errors()[0]['msg']}", value))
    return broken


def task_metrics(task: TaskSection, every: bool = False) -> list[str]:
    """The default metric list of a task (main first), or with ``every`` all the scalar metrics it reports: the task class says."""
    return TASKS[task.type].metric_names(task, every)


class Recipe(Section):
    name: Annotated[str, Field(pattern=NAME_PATTERN)] = Field(
        ..., description="Name of the micro-model (letters, digits, `-_.`); names the workspace folder and registered model."
    )
    task: TaskConfig = Field(..., description="What the micro-model does.")
    data: DataConfig = Field(..., description="Where the annotated examples are.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The base model.")
    method: MethodConfig = Field(default_factory=LoraConfig, description="Fine-tuning method (`kind` picks it).")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training hyper-parameters.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation against prompted baselines.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking and registry.")
    gate: GateConfig = Field(default_factory=GateConfig, description="When a new version replaces the champion.")
    watch: WatchConfig = Field(default_factory=WatchConfig, description="`microtune watch`: new data and drift trigger a gated retrain.")
    synth: SynthConfig | None = Field(None, description="Synthetic data (`microtune synth`); omitted: none.")
    tune: TuneConfig = Field(default_factory=TuneConfig, description="`microtune tune`: the hyper-parameter search space.")

    @model_validator(mode="after")
    def _known_metrics(self) -> Recipe:
        allowed = task_metrics(self.task, every=True)
        unknown = [m for m in self.eval.metrics or [] if m not in allowed]
        if unknown:
            raise ValueError(f"eval.metrics: {', '.join(map(repr, unknown))} not reported for this task "
                             f"(one of: {', '.join(allowed)})")
        return self

    @field_validator("train")
    @classmethod
    def _train_fits_method(cls, train: TrainConfig, info: ValidationInfo) -> TrainConfig:
        """Options the method cannot train with, from its capability flags, all at once with their YAML paths.

        A validator of `train` (not of the whole recipe): it runs even when other sections have errors, so
        `check` reports these beside them; `method` is validated before `train`, and is absent when invalid."""
        method = info.data.get("method")
        return _raise_rules(_method_rules(getattr(method, "kind", None), train)) or train

    @model_validator(mode="after")
    def _precision_fits(self) -> Recipe:
        """`model.dtype`/`model.attention` against the method and `train` (a whole-recipe rule: `train` and `model` may be
        left at their defaults, and a field validator never sees a default)."""
        return _raise_rules(_precision_rules(self.model, self.method.kind, self.train)) or self

    @field_validator("eval")
    @classmethod
    def _baselines_fit_task(cls, cfg: EvalConfig, info: ValidationInfo) -> EvalConfig:
        """Every `eval.baselines` entry must be one the task type declares (``Task.baselines``), each at its own line.
        `task` is validated before `eval`; it is absent when invalid (its own errors are reported instead)."""
        task = info.data.get("task")
        if task is None:
            return cfg
        allowed = tasks.baselines_of(TASKS[task.type])
        broken = [(("eval", "baselines", str(i)), f"baseline {name!r} does not fit task.type {task.type}; "
                   f"its baselines are: {', '.join(allowed)}", name) for i, name in enumerate(cfg.baselines) if name not in allowed]
        broken += [(("eval", "baselines", str(i)), f"baseline {name!r} is listed twice; list each once", name)
                   for i, name in enumerate(cfg.baselines) if name in cfg.baselines[:i]]
        return _raise_rules(broken) or cfg

    @field_validator("gate")
    @classmethod
    def _gate_fits_task(cls, gate: GateConfig, info: ValidationInfo) -> GateConfig:
        """`gate.beat_classical` needs a task type with the classical baseline; elsewhere it would be silently ignored."""
        task = info.data.get("task")
        if task is None or not gate.beat_classical or "classical" in tasks.baselines_of(TASKS[task.type]):
            return gate
        having = [n for n, t in TASKS.items() if "classical" in tasks.baselines_of(t)]
        return _raise_rules([(("gate", "beat_classical"), f"gate.beat_classical needs a task type with the classical baseline "
                              f"({', '.join(having)}), not {task.type}; remove it", True)]) or gate

    @field_validator("synth")
    @classmethod
    def _synth_fits_task(cls, synth: SynthConfig | None, info: ValidationInfo) -> SynthConfig | None:
        """A `synth` section for a task type that synth cannot make rows of is refused when the recipe loads (at `check`),
        with the task type's reason and alternative, rather than when `microtune synth` runs."""
        task = info.data.get("task")
        if synth is None or task is None or TASKS[task.type](task, []).synth() is not None:
            return synth
        kind = TASKS[task.type]
        reason = getattr(kind, "synth_refusal", "its task class has no synth hooks")
        fix = getattr(kind, "synth_alternative", "remove the `synth` section and train on real rows only")
        return _raise_rules([(("synth",), f"`microtune synth` does not support task.type {task.type}: {reason}; fix: {fix}",
                              "synth section")]) or synth

    @field_validator("tune")
    @classmethod
    def _tune_fits(cls, tune: TuneConfig, info: ValidationInfo) -> TuneConfig:
        """Searched paths, kinds and ranges checked when the recipe loads, each at its own YAML line (as the method rules)."""
        broken = _tune_rules(tune, getattr(info.data.get("method"), "kind", None))
        task = info.data.get("task")
        if tune.metric is not None and task is not None and tune.metric not in (allowed := [*task_metrics(task, every=True), "valid_loss"]):
            broken.append((("tune", "metric"), f"tune.metric {tune.metric!r} is not reported for this task (one of: {', '.join(allowed)})",
                           tune.metric))
        if broken:
            raise PydanticCustomError(_RULES, "{summary}", {"summary": " | ".join(m for _, m, _ in broken),
                                                            "rules": [list(b) for b in broken]})
        return tune

    def metric_names(self) -> list[str]:
        """The metrics to report, main metric first (``eval.metrics`` or the task's default)."""
        return self.eval.metrics or task_metrics(self.task)

    def resolved(self) -> dict[str, Any]:
        """The full recipe as plain JSON-able data (paths as strings), for manifests and MLflow."""
        return self.model_dump(mode="json")

    def with_overrides(self, overrides: list[str]) -> Recipe:
        """This recipe with ``a.b=value`` overrides applied (as `load_recipe` applies them to the YAML), validated again.

        The recipe itself is left as it is; without overrides it is returned unchanged. Paths already
        resolved stay absolute; a relative path given in an override is taken as it is written.
        """
        if isinstance(overrides, str):  # iterating a string would apply one "override" per character
            raise RecipeError(f"overrides must be a list of a.b=value strings, got the string {overrides!r}",
                              hint=f"wrap it in a list: with_overrides([{overrides!r}])")
        if not overrides:
            return self
        raw = self.resolved()
        for item in overrides:
            apply_override(raw, item)
        return validate_recipe(raw, source=f"recipe {self.name!r} with overrides {list(overrides)}")

    def retrain_recipe(self) -> Recipe:
        """The recipe `watch` retrains with (``watch.retrain`` applied); a RecipeError naming ``watch.retrain`` when
        those overrides do not apply to this recipe — `check` and `watch` ask before any data is taken in."""
        try:
            return self.with_overrides(self.watch.retrain)
        except RecipeError as exc:
            raise RecipeError(f"watch.retrain {self.watch.retrain}: the recipe a retrain would use does not validate",
                              hint="fix those overrides, or set watch.retrain: [] to retrain with the recipe as it is",
                              problems=exc.problems) from None


def _rebuild_recipe() -> None:
    """Rebuild the Recipe's schema after a method or task type was (un)registered, so its unions hold it."""
    Recipe.model_rebuild(force=True)


methods.on_change(_rebuild_recipe)
tasks.on_change(_rebuild_recipe)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe YAML, apply ``a.b=value`` overrides, validate, resolve data paths."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path}", hint="pass the path of a recipe YAML (see recipes/)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text (byte {exc.object[exc.start:exc.start + 1]!r} at offset {exc.start})",
                          hint="save the recipe as UTF-8") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}", hint="fix the YAML syntax at the line shown") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping", problems=[Problem(str(path), "top level is not a mapping", repr(raw)[:60])])
    for item in overrides or []:
        apply_override(raw, item)
    recipe = validate_recipe(raw, source=str(path), lines=_line_index(text))
    return _resolve_paths(recipe, path.parent)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML (so `3`, `true`, `[a, b]`)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"override {item!r} is not of the form a.b=value", hint="write e.g. --set train.epochs=2")
    *parents, leaf = key.strip().split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"override {item!r}: {part!r} is not a section", hint="override a leaf key inside a section")
        node = child
    parsed = yaml.safe_load(value) if value.strip() else ""
    if parents == ["method"] and leaf == "kind":
        _switch_kind(node, parsed)
    node[leaf] = parsed


def _switch_kind(section: dict[str, Any], kind: Any) -> None:
    """An override that changes ``method.kind`` keeps only the method settings the new kind has (e.g. a LoRA recipe's
    ``r`` and ``alpha`` for ``qlora``), so ``--set method.kind=ia3`` and `watch.retrain`'s ``method.kind=qlora`` apply to a
    recipe of any method; the others (``num_virtual_tokens`` on the way to LoRA, ``r`` on the way to IA3) are dropped with
    a warning, and unset values (None) fall back to the new kind's defaults. An unknown kind is left to validation."""
    old = section.get("kind", "lora")
    fields = methods.configs().get(kind) if isinstance(kind, str) else None
    if fields is None or kind == old:
        return
    dropped = [key for key in section if key != "kind" and (key not in fields.model_fields or section[key] is None)]
    for key in dropped:
        value = section.pop(key)
        said = f"method.kind={kind}: method.{key}={value!r} dropped (a {old} setting that {kind} does not have)"
        if value is not None and said not in _SAID:  # once a process: watch applies its retrain overrides every cycle
            _SAID.add(said)
            log.warning(said)


_SAID: set[str] = set()


def validate_recipe(raw: dict[str, Any], source: str = "<recipe>", lines: dict[tuple, int] | None = None) -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        errors = [e for err in _or_auto(exc.errors()) for e in _split_rules(err)]
        problems = [_problem(e, source, lines or {}, raw.get("method")) for e in errors]
        raise RecipeError(
            f"{source}: {len(problems)} problem(s) in the recipe",
            hint="fix each field above (`microtune recipe-schema` lists every field)",
            problems=problems,
        ) from None


_AUTO_TAG = "literal['auto']"


def _or_auto(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A setting that takes a number or `auto` (train.epochs, lr, batch_size) fails both branches of its union: one
    error at the setting's own path, the number's message and that `auto` is the other choice."""
    out = []
    for err in errors:
        loc = tuple(err["loc"])
        if loc and loc[-1] == _AUTO_TAG:
            continue
        if any(tuple(e["loc"]) == (*loc[:-1], _AUTO_TAG) for e in errors):
            err = err | {"loc": loc[:-1], "msg": f"{err['msg']}, or 'auto' (chosen from the data)"}
        out.append(err)
    return out


def _split_rules(err: dict[str, Any]) -> list[dict[str, Any]]:
    """The method-vs-option rules come as one pydantic error; each becomes its own error at its own path."""
    if err["type"] != _RULES:
        return [err]
    return [{"type": _RULES, "loc": path, "msg": message, "input": got} for path, message, got in err["ctx"]["rules"]]


def _problem(err: dict[str, Any], source: str, lines: dict[tuple, int], raw_method: Any = None) -> Problem:
    loc = tuple(str(x) for x in err["loc"])
    if len(loc) > 1 and loc[0] == "method" and loc[1] in methods.kinds():  # pydantic puts the union tag in the path
        loc = (loc[0], *loc[2:])
    if len(loc) > 2 and loc[0] == "data" and loc[2] in _SOURCE_TAGS:  # data.train.hf.split → data.train.split
        loc = (*loc[:2], *loc[3:])
    loc, task_message = _task_loc(err, loc)
    dotted = ".".join(loc) or "<top>"
    line = lines.get(loc) or lines.get(loc[:-1])
    where = f"{source}:{line} {dotted}" if line else f"{source} {dotted}"
    if task_message:
        return Problem(where, task_message)
    if err["type"] == "extra_forbidden":
        near = difflib.get_close_matches(loc[-1], _fields_at(loc[:-1], raw_method), n=1, cutoff=0.5)
        msg = f"unknown key {loc[-1]!r}" + (f"; did you mean {near[0]!r}?" if near else "")
        return Problem(where, msg)
    got = err.get("input")
    if err["type"] == "union_tag_invalid":
        tag = err["ctx"]["tag"]
        near = difflib.get_close_matches(tag, methods.kinds(), n=1, cutoff=0.5)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        return Problem(where, f"unknown kind {tag!r}{hint} (one of: {', '.join(methods.kinds())})")
    return Problem(where, err["msg"], None if err["type"] == "missing" else repr(got)[:80])


def _task_loc(err: dict[str, Any], loc: tuple[str, ...]) -> tuple[tuple[str, ...], str | None]:
    """The task section's part of ``_problem``: drop the union tag pydantic puts after `task` (as for `method`), and
    word the errors of the union itself: an unknown `type`, a key that this task type does not have."""
    if loc[:1] != ("task",):
        return loc, None
    task_type = loc[1] if len(loc) > 1 and loc[1] in TASKS else None
    loc = (loc[0], *loc[2:]) if task_type else loc
    if err["type"] == "union_tag_not_found":  # `type: null`
        return ("task", "type"), f"task.type is empty; give one of: {', '.join(TASKS)} (or omit it for {DEFAULT_TASK})"
    if err["type"] == "union_tag_invalid":
        tag = str(err["ctx"]["tag"])
        near = difflib.get_close_matches(tag, list(TASKS), n=1, cutoff=0.5)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        return ("task", "type"), f"unknown task type {tag!r}{hint} (one of: {', '.join(TASKS)})"
    if err["type"] == "extra_forbidden" and task_type and len(loc) == 2:
        return loc, _task_key_message(loc[-1], task_type)
    return loc, None


def _task_key_message(key: str, task_type: str) -> str:
    """An unknown key in the task section: say which task types it belongs to, else suggest the nearest key."""
    owners = {f: [n for n, c in TASKS.items() if f in c.config.model_fields] for c in TASKS.values() for f in c.config.model_fields}
    if key in owners:
        return f"key {key!r} is not valid for task.type {task_type}; it applies to task.type {' or '.join(owners[key])}"
    near = difflib.get_close_matches(key, list(TASKS[task_type].config.model_fields), n=1, cutoff=0.5)
    if near:
        return f"unknown key {key!r}; did you mean {near[0]!r}? (task.type {task_type})"
    near = difflib.get_close_matches(key, list(owners), n=1, cutoff=0.5)
    elsewhere = f"; did you mean {near[0]!r}? It applies to task.type {' or '.join(owners[near[0]])}" if near else ""
    return f"unknown key {key!r} for task.type {task_type}{elsewhere}"


def _fields_at(loc: tuple[str, ...], raw_method: Any = None) -> list[str]:
    model: type[BaseModel] = Recipe
    for part in loc:
        field = model.model_fields.get(part)
        ann = getattr(field, "annotation", None)
        if part == "method":
            ann = methods.configs().get(str(_method_kind(raw_method)), LoraConfig)
        if model is DataConfig and part in ("train", "valid", "test"):
            ann = HfSource  # a key inside a data source is a key of `{hf: ...}` (a path has none)
        ann = next((a for a in get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)), ann)  # `X | None` → X
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _line_index(text: str) -> dict[tuple, int]:
    """Map each YAML key path to its 1-based line, for error messages."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    index: dict[tuple, int] = {}

    def walk(n: Any, path: tuple) -> None:
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                index[(*path, str(k.value))] = k.start_mark.line + 1
                walk(v, (*path, str(k.value)))
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                index[(*path, str(i))] = v.start_mark.line + 1
                walk(v, (*path, str(i)))

    walk(node, ())
    return index


def _resolve_paths(recipe: Recipe, base: Path) -> Recipe:
    data = recipe.data
    for name in ("train", "valid", "test"):
        value = getattr(data, name)
        if isinstance(value, HfSource):
            value.hf = _local_hf(value.hf, base)
        elif value is not None and not value.is_absolute():
            setattr(data, name, (base / value).resolve())
    if recipe.watch.inbox is not None and not recipe.watch.inbox.is_absolute():
        recipe.watch.inbox = (base / recipe.watch.inbox).resolve()
    mix = recipe.synth.mix if recipe.synth else None
    if mix is not None and mix.artifact is not None and not mix.artifact.is_absolute():
        mix.artifact = (base / mix.artifact).resolve()
    return recipe


def _local_hf(hf: str, base: Path) -> str:
    """``hf`` as an absolute folder when it names one: written like a path (``./x``, ``/x``, ``~/x``, ``a/b/c``) or an
    existing folder next to the recipe; otherwise it stays a hub id (``name`` or ``owner/name``)."""
    path = Path(hf).expanduser()
    path_like = hf.startswith((".", "/", "~")) or "\\" in hf or hf.count("/") > 1
    if path.is_absolute():
        return str(path)
    if path_like or (base / path).exists():
        return str((base / path).resolve())
    return hf


def artifact_recipe(path: str | Path) -> Recipe:
    """The resolved recipe an artifact stores (``recipe.json``). Keys this version no longer knows are dropped,
    so artifacts written by an older microtune stay loadable; any other problem is still an error."""
    import json

    path = Path(path)
    raw = json.loads(path.read_text(encoding="utf-8"))
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        if not all(e["type"] == "extra_forbidden" for e in errors):
            return validate_recipe(raw, source=str(path))
        for err in errors:
            node: Any = raw
            *parents, leaf = _without_tags([str(x) for x in err["loc"]])
            for key in parents:
                node = node.get(key, {}) if isinstance(node, dict) else {}
            if isinstance(node, dict):
                node.pop(leaf, None)
        return validate_recipe(raw, source=str(path))


def _without_tags(loc: list[str]) -> list[str]:
    """An error path as a path into the raw recipe: pydantic adds the union tag after `method` and `task`."""
    if len(loc) > 2 and (loc[0], loc[1]) in {("method", k) for k in methods.kinds()} | {("task", t) for t in TASKS}:
        return [loc[0], *loc[2:]]
    if len(loc) > 2 and loc[0] == "data" and loc[2] in _SOURCE_TAGS:
        return [*loc[:2], *loc[3:]]
    return loc


def recipe_schema() -> dict[str, Any]:
    """The JSON schema of a recipe, with every field's description."""
    return Recipe.model_json_schema()
