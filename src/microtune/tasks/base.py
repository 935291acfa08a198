"""The task protocol every task type implements, its recipe-section base, and the pieces task types share.

A task type is one module: a config section (a ``TaskSection`` subclass with a ``type`` literal and only
its own fields) and a task class that satisfies ``Task``. Registering the class in ``microtune.tasks.TASKS``
is the one other line: the recipe's ``task`` union, the metric lists and every stage read it from there.

``Task`` is a ``typing.Protocol`` rather than an ABC: a plugin satisfies it by shape, without importing a
base class, and callers are typed against it either way. The built-in tasks subclass it explicitly to
inherit the few members that follow from others (``main_metric``, ``candidates``, ``atoms_of``).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

from pydantic import Field

from microtune.core.schema import Section

Row = dict[str, Any]
Message = dict[str, str]
RowProblems = list[tuple[str, Any]]  # (reason, got) pairs; the data stage turns them into file:line problems
PROMPTED = ("zero_shot", "few_shot")  # the prompted baselines of the base model: every task type has them
Scoring = Literal["trie", "loglik"]  # how a closed-set decoder picks its answer: see DecoderSpec
SCORINGS: tuple[str, ...] = ("trie", "loglik")
# The scorer a recipe gets when it names none: `loglik`, measured better than `trie` on the classify recipes
# (banking-intents +1.7, clinc150-oos +4.3 accuracy points, both paired intervals above 0; BENCHMARKS.md "Label scoring")
# at 3.2–3.5× the trie walk's time, pruned (unpruned: 4–10×). Every artifact's recipe.json records its own choice.
DEFAULT_SCORING: Scoring = "loglik"

TYPE_DESCRIPTION = (
    "Task type: `classify` (text → label, or labels with multi_label), `extract` (text → JSON "
    "object with the `fields`), `generate` (text → free text, e.g. a summary), `chat` (a multi-turn conversation in "
    "OpenAI's chat format → the next assistant reply)."
)


def type_field(name: str) -> Any:
    """The ``type`` field of a task section: the union tag, defaulting to the section's own type."""
    return Field(name, description=TYPE_DESCRIPTION)


class TaskSection(Section):
    """Fields every task type has. Each task module subclasses it with ``type: Literal[<name>]`` and its own fields.

    OpenAI chat rows (``data.format: openai_chat``) put the user turn under ``text`` and the assistant's answer
    under ``label``; a task reads them by pointing ``text_field`` and its answer field (``label_field`` or
    ``target_field``) at those names.
    """

    type: str = Field(..., description=TYPE_DESCRIPTION)
    instruction: str = Field(
        ..., min_length=1, description="What the model must do, in plain words; it becomes the system prompt."
    )
    text_field: str = Field("text", description="Field of a JSONL/CSV row that holds the input text.")

    def declared_labels(self) -> list[str] | None:
        """The label set the recipe declares; ``None`` when it is inferred from train (or the task has no labels)."""
        return None


class GeneratedSection(TaskSection):
    """Fields of the task types whose answer is generated text and parsed afterwards (extract, generate)."""

    target_field: str = Field(
        "target", description="extract: field with the JSON object (or its JSON text); generate: field with the target "
        "text (a list of strings = several references; training uses the first)."
    )
    max_new_tokens: int = Field(96, ge=1, le=2048, description="extract/generate: longest answer generated, in tokens.")


@dataclass(frozen=True)
class DecoderSpec:
    """How answers are decoded: ``labels`` picks among ``candidates`` (a token trie, every answer valid);
    ``json`` generates up to ``max_new_tokens`` an object that follows ``schema`` (grammar-constrained per row:
    ``models.constrain``, so every answer parses, closed in time at the token budget); ``free`` generates text.
    The task's ``parse`` still maps the answer (constrained or an endpoint's) to what its metrics compare.

    ``scoring`` (``labels`` only) is how the answer is picked among the candidates: ``trie`` walks the token trie
    greedily (per step the most probable allowed token; the probability is the product of the per-step probabilities
    renormalised over the allowed tokens), ``loglik`` ranks every candidate by its full-sequence log-likelihood (the
    sum of its tokens' log-probabilities, not renormalised) and reports the softmax over candidates of those sums
    (``models.decoding.LabelPredictor`` implements both).
    """

    kind: Literal["labels", "json", "free"]
    candidates: list[str] | None = None
    schema: dict[str, Any] | None = None
    max_new_tokens: int | None = None
    scoring: Scoring = DEFAULT_SCORING

    def __post_init__(self) -> None:
        if self.kind == "labels" and self.candidates is None:
            raise ValueError("DecoderSpec(kind='labels') needs the candidate answers")
        if self.kind == "json" and self.schema is None:
            raise ValueError("DecoderSpec(kind='json') needs the answer's JSON schema")
        if self.kind != "labels" and (self.max_new_tokens is None or self.max_new_tokens < 1):
            raise ValueError(f"DecoderSpec(kind={self.kind!r}) needs max_new_tokens >= 1")
        if self.scoring not in SCORINGS:
            raise ValueError(f"DecoderSpec scoring must be one of {list(SCORINGS)}, got {self.scoring!r}")
        if self.kind != "labels" and self.scoring != DEFAULT_SCORING:  # a generated answer has no candidates to rank
            raise ValueError(f"DecoderSpec(kind={self.kind!r}) picks among no candidates; scoring applies to kind 'labels' only")


class SynthAsk(Protocol):
    """One planned teacher request as a task's synth prompt sees it (``synthesis.plan.PlannedRequest`` is one).

    ``label`` is the request's stratum: the label for a task with labels, else the task's own grouping of
    rows (``SynthHooks.stratum``, e.g. which extract fields are filled)."""

    label: str
    n: int
    exemplars: list[Row]
    attributes: dict[str, str]


@dataclass(frozen=True)
class SynthHooks:
    """How `microtune synth` asks a teacher for rows of a task and checks what comes back.

    ``request`` writes the prompt for one planned request; ``parse_row`` maps one item of the teacher's
    answer (a JSON object) to an example of the task (``{"text", "label"}`` for classify) or gives the reason
    it is not a valid row; ``answer_row`` writes a real row the way the teacher should answer (it teaches a
    local teacher the format); ``filters`` names the filter stages that apply (from ``synthesis.filters.STAGES``).

    The plan draws rows per stratum: ``stratum`` names an example's stratum, ``None`` meaning its label (the task
    has labels: per-label quotas and proportions apply). A task without labels gives its own grouping, e.g. which
    fields are filled, or one stratum for all rows; ``strata`` says in words what its strata are (for messages).
    """

    request: Callable[[SynthAsk], list[Message]]
    parse_row: Callable[[dict[str, Any]], tuple[Row | None, str | None]]
    answer_row: Callable[[Row], dict[str, Any]]
    filters: tuple[str, ...]
    stratum: Callable[[Row], str] | None = None
    strata: str = "labels"


@runtime_checkable
class Task(Protocol):
    """A task type. ``TASKS[type](cfg, labels)`` builds one for a recipe's task section and the dataset's labels.

    Class level (used before a dataset exists): ``name``, ``config``, ``has_labels``, ``normalize``,
    ``label_of``, ``atoms_of``, ``metric_names``, ``main_metric``. Instance level: prompts, decoding,
    parsing, scoring and synth, which need the labels.
    """

    name: ClassVar[str]  # the `task.type` tag
    config: ClassVar[type[TaskSection]]  # the recipe section of this type
    has_labels: ClassVar[bool]  # rows carry labels: stratified splits, balancing, label checks, McNemar
    # the `eval.baselines` this type can be compared with: the prompted ones, plus the model-free ones that fit it
    # (`classical` for a closed label set, `lead` for free text); the recipe refuses any other name at its line
    baselines: ClassVar[tuple[str, ...]] = PROMPTED
    cfg: TaskSection
    labels: list[str]

    # -- rows -------------------------------------------------------------------------------------
    @staticmethod
    def normalize(row: dict[str, Any], cfg: Any) -> tuple[Row | None, RowProblems]:
        """Map a raw row to an example; on failure ``None`` and every problem as ``(reason, got)``."""
        ...

    @staticmethod
    def label_of(example: Row) -> str | None:
        """The example's stratum for splits and balancing; ``None`` for tasks without labels."""
        ...

    @classmethod
    def atoms_of(cls, example: Row) -> list[str]:
        """The labels an example uses (what a declared label set must contain)."""
        label = cls.label_of(example)
        return [] if label is None else [label]

    # -- prompts and answers ----------------------------------------------------------------------
    def messages(self, example: Row, *, label_list: bool = False, shots: Sequence[Row] = ()) -> list[Message]:
        """Chat messages up to the answer; ``label_list`` and ``shots`` make the prompted baselines' prompt."""
        ...

    def target(self, example: Row) -> str:
        """The completion the model is trained on."""
        ...

    def decoder(self) -> DecoderSpec:
        """How answers are decoded (a closed label set, a JSON object, free text)."""
        ...

    def candidates(self) -> list[str] | None:
        """Every valid answer when the decoder picks among a closed set, else ``None``."""
        spec = self.decoder()
        return list(spec.candidates or []) if spec.kind == "labels" else None

    def gold(self, example: Row) -> Any:
        """What ``metrics`` compares predictions with."""
        ...

    def parse(self, output: str) -> Any | None:
        """Map raw model output to an answer, or ``None`` when it is not a valid one."""
        ...

    # -- metrics ----------------------------------------------------------------------------------
    def metrics(self, golds: Sequence[Any], preds: Sequence[Any]) -> dict[str, Any]:
        """Every metric of ``metric_names(cfg, every=True)`` (plus non-scalar tables, e.g. per label)."""
        ...

    def example_scores(self, golds: Sequence[Any], preds: Sequence[Any]) -> list[float]:
        """One score per example: what the paired tests compare."""
        ...

    @classmethod
    def metric_names(cls, cfg: Any, every: bool = False) -> list[str]:
        """The default metric list, main metric first; with ``every``, all scalar metrics ``metrics`` reports."""
        ...

    @classmethod
    def main_metric(cls, cfg: Any) -> str:
        """The metric eval reports first, the gate compares and the registry tags (unless eval.metrics says otherwise)."""
        return cls.metric_names(cfg)[0]

    # -- synthetic data ---------------------------------------------------------------------------
    def synth(self) -> SynthHooks | None:
        """How `microtune synth` makes rows of this task; ``None``: synth does not support the task type."""
        ...


class TaskBase(Task):
    """What the built-in task types share: each is built from its recipe section and the dataset's labels."""

    name: ClassVar[str]
    config: ClassVar[type[TaskSection]]
    has_labels: ClassVar[bool]
    baselines: ClassVar[tuple[str, ...]] = PROMPTED

    def __init__(self, cfg: Any, labels: Sequence[str] = ()):
        self.cfg = cfg
        self.labels = list(labels)

    @staticmethod
    def normalize_input(row: dict[str, Any], cfg: Any) -> tuple[Row | None, RowProblems]:
        """The input part of a row — what ``messages`` reads — for prediction, where rows carry no answer
        (`microtune predict`); a type whose prompt reads more than ``text_field`` overrides it."""
        return normalize_input(row, cfg)


def normalize_input(row: dict[str, Any], cfg: Any) -> tuple[Row | None, RowProblems]:
    """The input text of a row under ``cfg.text_field`` as ``{"text": ...}``, or ``None`` and its problems (``check_text``'s)."""
    text, problems = check_text(row, cfg.text_field)
    return (None, problems) if problems else ({"text": text}, [])


def baselines_of(task: type[Task]) -> tuple[str, ...]:
    """The baselines a task type declares; a plugin that satisfies the protocol by shape and says nothing has the prompted ones."""
    return tuple(getattr(task, "baselines", PROMPTED))


def check_text(row: dict[str, Any], field: str) -> tuple[str, RowProblems]:
    """The row's input text (stripped) and the problems with it, as ``(reason, got)`` pairs."""
    if field not in row:
        return "", [(f"missing field {field!r}", f"keys {sorted(row)}")]
    value = row[field]
    if not isinstance(value, str):
        return "", [(f"field {field!r} is not a string", value)]
    if not value.strip():
        return "", [(f"field {field!r} is empty", value)]
    if "\x00" in value:  # a raw NUL byte already fails the readers; its JSON escape \u0000 must fail the same way
        return "", [(f"field {field!r} contains a NUL character (\\u0000): remove it", value[:60])]
    return value.strip(), []


def shot_turns(shots: Sequence[Mapping[str, Any]], target: Callable[[Any], str]) -> list[Message]:
    """Few-shot examples as user/assistant chat turns."""
    turns: list[Message] = []
    for shot in shots:
        turns += [{"role": "user", "content": shot["text"]}, {"role": "assistant", "content": target(shot)}]
    return turns


def example_rate(flags: Iterable[bool]) -> float:
    """Share of true flags (0.0 for none)."""
    values = list(flags)
    return sum(values) / len(values) if values else 0.0
