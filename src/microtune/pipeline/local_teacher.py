"""The offline default teacher for `synth`: the recipe's base model served by `microtune serve`, in-process.

    with served_teacher(recipe, workspace) as concrete:   # synth.teacher.base_url: local → http://127.0.0.1:<port>/v1
        ...                                              # concrete.synth.teacher names the running server and its model
    folder = tuned_teacher(recipe, workspace)            # synth.teacher.tune_steps: the base taught the request format

The server listens on 127.0.0.1 on a free port, without the registry and without auth, and is shut
down when the block ends. A small base model writes weak examples (SmolLM2-135M answers the synth
prompt with broken JSON); with ``synth.teacher.tune_steps`` it is first fine-tuned on requests built
from the real train rows, each answered by a real row of its label (label-conditioned generation, as in
LAMBADA, Anaby-Tavor et al. 2020) — or of its stratum for a task without labels (extract: the filled
fields; generate: any row) — merged, and that model is served. The fidelity holdout is never
shown to it. The merged teacher is kept under ``<workspace>/<name>/teacher/<hash>/`` and reused while
its rows, base and steps are the same. For real use, point `synth.teacher.base_url` at a bigger model.
"""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from microtune.config import Recipe, TeacherConfig, validate_recipe
from microtune.core.errors import ModelError
from microtune.core.hashing import hash_value
from microtune.core.jsonl import write_jsonl
from microtune.core.progress import Reporter, emitter
from microtune.core.workspace import Workspace
from microtune.data import read_split
from microtune.models.export import merge_adapter
from microtune.pipeline.check import check
from microtune.pipeline.train import train
from microtune.serving import ServeSettings, build_app
from microtune.synthesis import synth_config
from microtune.synthesis.plan import split_holdout, strata, tuning_rows, with_strata
from microtune.synthesis.stage import synth_hooks

LOCAL = "local"


@contextmanager
def served_teacher(recipe: Recipe, workspace: str | Path | None = None, reporter: Reporter | None = None) -> Iterator[Recipe]:
    """The recipe with a concrete teacher: itself when ``synth.teacher.base_url`` is a URL; for ``local``, a copy whose
    teacher is the base model (or, with ``tune_steps``, the tuned teacher) served on 127.0.0.1 while the block runs."""
    cfg = synth_config(recipe)
    if cfg.teacher.base_url != LOCAL:
        yield recipe
        return
    tuned = cfg.teacher.tune_steps is not None
    base = str(tuned_teacher(recipe, workspace, reporter)) if tuned else None
    with local_teacher(recipe, base=base, reporter=reporter) as (url, model):
        yield _with_teacher(recipe, url, model, one_per_request=tuned)


def _with_teacher(recipe: Recipe, url: str, model: str, one_per_request: bool) -> Recipe:
    """A copy of the recipe whose teacher is the running server; the tuned teacher learned one example per answer."""
    concrete = recipe.model_copy(deep=True)
    assert concrete.synth is not None  # served_teacher checked the section
    teacher = concrete.synth.teacher.model_dump() | {"base_url": url, "model": model}
    concrete.synth.teacher = TeacherConfig.model_validate(teacher)  # validated assignment (Section)
    if one_per_request:
        concrete.synth.examples_per_request = 1
    return concrete


def tuned_teacher(recipe: Recipe, workspace: str | Path | None, reporter: Reporter | None = None) -> Path:
    """The base model fine-tuned to answer this recipe's synth requests, merged into a plain model folder."""
    cfg, ws = synth_config(recipe), Workspace.at(workspace)
    assert cfg.teacher.tune_steps is not None
    checked = check(recipe, None, workspace)
    labels = checked.manifest["labels"]
    hooks = synth_hooks(recipe, labels)
    # the same holdout as the stage's (rows with their strata, the same seed): the teacher never learns a held-out row
    _, pool = split_holdout(with_strata(read_split(checked.dataset_dir, "train"), hooks), cfg.fidelity.holdout, cfg.seed)
    system, rows = tuning_rows(cfg, hooks, strata(hooks, labels, pool), pool)
    spec = {"name": f"{recipe.name}-teacher", "model": recipe.model.model_dump(mode="json"),
            "task": {"type": "generate", "instruction": system, "max_new_tokens": cfg.teacher.max_tokens},
            "method": {"kind": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"},
            "train": {"max_steps": cfg.teacher.tune_steps, "lr": 5.0e-4, "batch_size": 4, "max_seq_len": 768, "seed": cfg.seed},
            "eval": {"baselines": [], "latency_examples": 0}, "tracking": {"register_model": False}}
    folder = ws.stage_dir(recipe.name, "teacher") / hash_value({"spec": spec, "rows": rows})[:12]
    merged = folder / "merged"
    if (merged / "manifest.json").is_file():
        return merged
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "train.jsonl", rows)
    spec["data"] = {"train": str(folder / "train.jsonl"), "split": {"valid": 0.0, "test": 0.1}}
    adapter = train(validate_recipe(spec, source="synth.teacher.tune_steps"), None, ws.root, reporter)
    return merge_adapter(adapter, merged, force=True)


@contextmanager
def local_teacher(recipe: Recipe, start_timeout_s: float = 300, base: str | None = None,
                  reporter: Reporter | None = None) -> Iterator[tuple[str, str]]:
    """``(base_url, model)`` of `microtune serve` on ``base`` (default: the recipe's base model), running while the block runs."""
    import uvicorn  # heavy server stack: only when a local teacher is asked for

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    teacher = recipe.synth.teacher if recipe.synth else None
    base = base or recipe.model.base
    settings = ServeSettings(base=base, registry=False, host="127.0.0.1", port=port, poll_s=0,
                             max_tokens=max(teacher.max_tokens if teacher else 600, 16), timeout_s=600)
    server = uvicorn.Server(uvicorn.Config(build_app(settings, api_keys=[]), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="microtune-local-teacher", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise ModelError("the local teacher (microtune serve on the base model) did not start",
                             hint="set synth.teacher.base_url to another OpenAI-compatible endpoint")
        time.sleep(0.1)
    url = f"http://127.0.0.1:{port}/v1"
    emitter(reporter, "synth")("message", text=f"local teacher: {base} served at {url}")
    try:
        yield url, base
    finally:
        server.should_exit = True
        thread.join(timeout=60)
