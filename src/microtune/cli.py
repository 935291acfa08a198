"""The ``microtune`` command: a thin Typer shell over the pipeline functions.

    microtune check recipes/banking-intents.yaml
    microtune run   recipes/banking-intents.yaml --set train.epochs=1

Library errors (``MicrotuneError``) are printed with their fix; bad input exits with code 2. Progress and
messages of long steps come as events and are drawn by ``microtune.console`` (bars on a terminal, lines in logs).
"""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from microtune.console import ConsoleReporter
from microtune.core.errors import MicrotuneError
from microtune.core.version import __version__
from microtune.serving.settings import ServeSettings

app = typer.Typer(help="Turn a small open LLM into a task-specific micro-model.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
out = Console(width=None if sys.stdout.isatty() else 160)  # logs and pipes get whole tables, not 80-column wraps
err = Console(stderr=True)

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML (see recipes/).", show_default=False)]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a recipe field: a.b=value (repeatable).")]
WorkspaceOpt = Annotated[Path | None, typer.Option("--workspace", "-w", help="Runs, artifacts and the MLflow store. [default: .microtune]")]


class Mirror(str, Enum):
    wandb = "wandb"
    tensorboard = "tensorboard"


TrackerOpt = Annotated[list[Mirror] | None, typer.Option(
    "--tracker", help="Mirror the run's parameters and metrics to W&B or TensorBoard besides MLflow (repeatable); the same as "
    "--set 'tracking.backends=\\[mlflow, …]'. Needs pip install 'microtune\\[trackers]'.", show_default=False)]


def _tracked(set_: list[str] | None, tracker: list[Mirror] | None) -> list[str] | None:
    """``--tracker`` as the recipe override it stands for (after the --set ones, so it wins over a --set of the same key)."""
    if not tracker:
        return set_
    return [*(set_ or []), f"tracking.backends=[{', '.join(['mlflow', *dict.fromkeys(t.value for t in tracker)])}]"]


def _guard(fn: Callable[[], Any]) -> Any:
    """Run a command; turn MicrotuneError into a readable message and its exit code."""
    try:
        return fn()
    except MicrotuneError as exc:
        # the texts are the library's own, never rich markup: `pip install 'microtune[trackers]'` must print as it is
        err.print(f"[bold red]error:[/] {escape(exc.message)}", highlight=False, markup=True, soft_wrap=True)
        for problem in exc.problems:
            err.print(f"  {problem}", highlight=False, markup=False, soft_wrap=True)
        if exc.hint:
            err.print(f"[bold]fix:[/] {escape(exc.hint)}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None


def _reporter() -> ConsoleReporter:
    """Events of a step on stderr: a live bar on a terminal, a plain line every ~10 % otherwise (logs, CI, pipes)."""
    return ConsoleReporter(err)


@app.command()
def check(recipe: RecipeArg, set_: SetOpt = None, workspace: WorkspaceOpt = None) -> None:
    """Validate the recipe and every data row; print the data report. Exit 2 on any error."""
    from microtune import pipeline

    result = _guard(lambda: pipeline.check(recipe, set_, workspace))
    _show_check(result.manifest, result.dataset_dir)
    _show_chosen(result.chosen)
    _show_exports(result.exports)


@app.command()
def synth(recipe: RecipeArg, set_: SetOpt = None, workspace: WorkspaceOpt = None, tracker: TrackerOpt = None) -> None:
    """A teacher endpoint writes more examples; filters and fidelity tests against held-out real rows keep them honest."""
    from microtune import pipeline

    set_ = _tracked(set_, tracker)
    with _reporter() as report:
        folder = _guard(lambda: pipeline.synth(recipe, set_, workspace, report))
    _show_synth(folder)


@app.command()
def train(recipe: RecipeArg, set_: SetOpt = None, workspace: WorkspaceOpt = None,
          resume: Annotated[bool, typer.Option("--resume", help="Continue the newest unfinished run from its last checkpoint.")] = False,
          nproc: Annotated[int, typer.Option("--nproc", min=1, help="Processes (torchrun; gloo/CPU, NCCL/GPU); ddp or fsdp: train.distributed.")] = 1,
          tracker: TrackerOpt = None) -> None:
    """Fine-tune the base model (method.kind: lora, dora, qlora, ia3, prompt/prefix tuning, full); writes an adapter artifact."""
    from microtune import pipeline
    from microtune.training import distributed

    set_ = _tracked(set_, tracker)
    if nproc > 1 and distributed.world_size() == 1:
        argv = ["train", str(recipe), *[x for s in set_ or [] for x in ("--set", s)], *(["--resume"] if resume else []),
                *(["--workspace", str(workspace)] if workspace else [])]
        raise typer.Exit(distributed.launch(nproc, argv))
    with _reporter() as report:
        adapter = _guard(lambda: pipeline.train(recipe, set_, workspace, report, resume=resume))
    if distributed.is_main():
        _show_adapter(adapter)


@app.command("eval")
def eval_(recipe: RecipeArg, set_: SetOpt = None, workspace: WorkspaceOpt = None,
          adapter: Annotated[Path | None, typer.Option(help="Adapter folder. [default: the newest for the recipe]")] = None,
          tracker: TrackerOpt = None) -> None:
    """Micro-model vs the base model prompted zero-/few-shot (and any endpoints): intervals, p-values, latency, cost, report.html.

    Metrics by task: classify accuracy, macro-F1; extract micro-F1; generate ROUGE-L, -1, -2 (rouge-score, Porter-stemmed).
    Classify answers are picked by the recipe's task.scoring: `loglik` (default: every label ranked by its full-sequence
    log-likelihood) or `trie` (the greedy walk of the label token trie, faster), e.g. --set task.scoring=trie; serve uses the one
    in the adapter's recipe.json, written by train (docs/evaluation.md#label-scoring-the-trie-walk-or-the-full-log-likelihood).
    """
    from microtune import pipeline

    set_ = _tracked(set_, tracker)
    with _reporter() as report:
        folder = _guard(lambda: pipeline.evaluate(recipe, set_, workspace, adapter, report))
    _show_eval(folder)


@app.command()
def report(eval_dir: Annotated[Path, typer.Argument(help="Eval folder, e.g. .microtune/<recipe>/evals/<run>.", show_default=False)]) -> None:
    """Re-render report.html (+ PNG plots) from an eval artifact alone and print its summary table.

    The page comes from microtune's Jinja2 templates (autoescaped: markup in a label or input is shown as text).
    """
    from microtune import pipeline

    path = _guard(lambda: pipeline.report(eval_dir))
    _show_eval(eval_dir)
    out.print(f"report: {path}", highlight=False, markup=False, soft_wrap=True)


@app.command()
def run(recipe: RecipeArg, set_: SetOpt = None, workspace: WorkspaceOpt = None, tracker: TrackerOpt = None) -> None:
    """check → train → eval → register, one command."""
    _run(recipe, _tracked(set_, tracker), workspace)


@app.command()
def export(
    adapter: Annotated[Path, typer.Argument(help="Adapter folder written by `microtune train`.", show_default=False)],
    merge: Annotated[Path | None, typer.Option(
        "--merge", metavar="OUT", help="Write the base model with the adapter merged in (plain transformers).")] = None,
    vllm: Annotated[Path | None, typer.Option(
        "--vllm", metavar="OUT", help="Write a vLLM LoRA bundle: the adapter, serve.sh (the `vllm serve` command), vllm.json, README.md and "
        "request.json (the chat request that restricts answers to the labels: vLLM's structured_outputs).")] = None,
    gguf: Annotated[Path | None, typer.Option(
        "--gguf", metavar="OUT.gguf", help="Write the merged model as one GGUF file (llama.cpp, Ollama, LM Studio) and an Ollama "
        "Modelfile beside it (chat template, stop tokens, the task instruction as SYSTEM). Llama-architecture bases "
        "(SmolLM2); lora, qlora, dora, ia3 and full runs (prompt/prefix tuning have no weights to merge).")] = None,
    gguf_type: Annotated[str | None, typer.Option(
        "--gguf-type", metavar="TYPE", help="GGUF weights: f16, bf16, q8_0 (about half of f16) or f32. q4_k is not offered: the "
        "gguf package cannot write k-quants; run llama.cpp's llama-quantize on the f16 file. \\[default: f16]")] = None,
    name: Annotated[str | None, typer.Option(help="vLLM LoRA module name. \\[default: the recipe name]")] = None,
    dtype: Annotated[str | None, typer.Option(help="Merged weights: float32, bfloat16 or float16. \\[default: float32]")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Replace OUT when it exists and is not empty (for --gguf: the file and its Modelfile).")] = False,
) -> None:
    """Merge an adapter into its base model (--merge), bundle it for vLLM serving (--vllm) and/or write a GGUF with an Ollama Modelfile (--gguf)."""
    from microtune import pipeline
    from microtune.core.artifacts import read_json

    written = _guard(lambda: pipeline.export(adapter, merge, vllm, dtype=dtype, name=name, force=force, gguf=gguf, gguf_type=gguf_type))
    for kind, path in written.items():
        if kind == "modelfile":
            out.print(f"Ollama Modelfile: {path}\n  load: ollama create NAME -f {path}", highlight=False, markup=False, soft_wrap=True)
            continue
        if kind == "gguf":
            out.print(f"GGUF: {path} ({path.stat().st_size / 1e6:.1f} MB)", highlight=False, markup=False, soft_wrap=True)
            continue
        files = ", ".join(sorted(p.name for p in path.iterdir()))
        out.print(f"{'merged model' if kind == 'merge' else 'vLLM bundle'}: {path}\n  {files}", highlight=False, markup=False)
        if kind == "vllm":
            spec = read_json(path / "vllm.json")
            out.print(f"  serve: {spec['command']}", highlight=False, markup=False, soft_wrap=True)
            if spec.get("trained_base"):
                out.print(f"  or, on the exact weights it was trained on (offline): MICROTUNE_BASE_MODEL={spec['trained_base']} "
                          f"{path / 'serve.sh'}", highlight=False, markup=False, soft_wrap=True)
            out.print(f"  ask: POST /v1/chat/completions with {path / 'request.json'} (README.md there)", highlight=False, markup=False,
                      soft_wrap=True)


class InputFormat(str, Enum):
    """`predict --format`: the values of data.format."""

    auto = "auto"
    jsonl = "jsonl"
    csv = "csv"
    openai_chat = "openai_chat"
    parquet = "parquet"


@app.command()
def predict(
    model: Annotated[str, typer.Argument(help="An adapter folder, or a registered model: NAME@champion, NAME@ALIAS, NAME@v3 (a version) "
                                              "or NAME (its champion, else its newest version).", show_default=False)],
    input_: Annotated[Path, typer.Option("--input", "-i", help="Rows to answer: JSONL, CSV or Parquet (or a Dataset.save_to_disk folder); "
                                                             "each row needs only the task's input field (task.text_field).",
                                         show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Answers: .jsonl, .csv or .parquet (by extension), written whole or "
                                                                "not at all; an existing file is replaced.", show_default=False)],
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Answer the good rows and write the bad ones to OUTPUT.rejects.jsonl "
                                                              "(without it a bad row exits 2 and nothing is written).")] = False,
    id_field: Annotated[str, typer.Option(help="Input field copied to each answer as `id`, when rows have it.")] = "id",
    input_format: Annotated[InputFormat, typer.Option("--format", help="Input format; auto decides by extension and a `messages` key.")
                            ] = InputFormat.auto,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Rows per batch, sorted by length (a classify batch takes at most "
                                                 "two forward passes; see docs/speed.md). \\[default: the recipe's eval.batch_size]")] = None,
    workspace: WorkspaceOpt = None,
) -> None:
    """Answer every row of a file with a micro-model: the label and its probability (classify), the parsed JSON (extract) or the text."""
    from microtune import pipeline

    with _reporter() as report:
        result = _guard(lambda: pipeline.predict(model, input_, output, workspace=workspace, skip_bad=skip_bad, id_field=id_field,
                                                 input_format=input_format.value, batch_size=batch_size, reporter=report))
    which = f"{model} (version {result.version})" if result.version else str(result.adapter_dir)
    out.print(f"answered {result.rows} row(s) with {which}: {result.output}", highlight=False, markup=False, soft_wrap=True)
    if result.rejects is not None:
        _show_rejects(result.rejects, result.rejected)


def _show_rejects(path: Path, count: int, shown: int = 20) -> None:
    """The skipped rows on stderr, each at its file:line (the first ``shown``; all of them are in the rejects file)."""
    from microtune.core.jsonl import read_jsonl

    rejects = read_jsonl(path)
    for reject in rejects[:shown]:
        err.print(f"[yellow]skipped:[/] {escape(reject['source'])}: {escape('; '.join(reject['problems']))}", highlight=False, soft_wrap=True)
    more = f" ({count - shown} more not shown)" if count > shown else ""
    err.print(f"skipped {count} bad row(s){more}: {escape(str(path))}", highlight=False, soft_wrap=True)


_SERVE = ServeSettings.model_fields  # the `serve` options' defaults and bounds: defined once, there (the Python API shares them)


class QloraBase(str, Enum):
    """`serve --qlora-base`: the values of ServeSettings.qlora_base."""

    full = "full"
    four_bit = "4bit"


def _bounds(field: str) -> dict[str, Any]:
    """``min``/``max`` of a `serve` option from the ge/le of its ServeSettings field: out of range is a usage error (exit 2)."""
    meta = _SERVE[field].metadata
    return {"min": next((m.ge for m in meta if hasattr(m, "ge")), None), "max": next((m.le for m in meta if hasattr(m, "le")), None)}


@app.command()
def serve(
    adapter: Annotated[list[str] | None, typer.Option(
        "--adapter", "-a", metavar="NAME=PATH", help="Serve an adapter folder as model NAME (repeatable).")] = None,
    base: Annotated[str | None, typer.Option(help="Base model. \\[default: the first adapter's base, else smollm2-135m-instruct]")] = None,
    host: Annotated[str, typer.Option(help="Interface to listen on (0.0.0.0: the network).")] = _SERVE["host"].default,
    port: Annotated[int, typer.Option(help="TCP port.", **_bounds("port"))] = _SERVE["port"].default,
    workspace: WorkspaceOpt = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow store to resolve registered models in. \\[default: $MLFLOW_TRACKING_URI, "
                                                          "else the workspace's]")] = _SERVE["tracking_uri"].default,
    registry: Annotated[bool, typer.Option("--registry/--no-registry",
                                           help="Resolve other model names in the MLflow registry.")] = _SERVE["registry"].default,
    api_key_file: Annotated[Path | None, typer.Option(help="Accepted API keys, one per line (plus $MICROTUNE_API_KEYS).")] = None,
    max_loaded: Annotated[int, typer.Option(help="Micro-models in memory at once (LRU).", **_bounds("max_loaded"))] = _SERVE["max_loaded"].default,
    max_memory_mb: Annotated[int, typer.Option(help="Memory budget of the loaded micro-models beyond the base, MB (LRU).",
                                               **_bounds("max_memory_mb"))] = _SERVE["max_memory_mb"].default,
    qlora_base: Annotated[QloraBase, typer.Option(help="qlora adapters on the shared full-precision base (full: mixed batches) or "
                                                       "on their own 4-bit base (4bit).")] = QloraBase.full,  # ServeSettings.qlora_base default
    max_batch: Annotated[int, typer.Option(help="Requests per forward batch.", **_bounds("max_batch"))] = _SERVE["max_batch"].default,
    batch_window_ms: Annotated[float, typer.Option(help="Batching window (ms): a batch takes requests while each follows the last within it.",
                                                   **_bounds("batch_window_ms"))] = _SERVE["batch_window_ms"].default,
    max_queue: Annotated[int, typer.Option(help="Waiting requests before 429.", **_bounds("max_queue"))] = _SERVE["max_queue"].default,
    max_tokens: Annotated[int, typer.Option(help="Largest max_tokens a request may ask for.",
                                            **_bounds("max_tokens"))] = _SERVE["max_tokens"].default,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body (413 beyond).",
                                                **_bounds("max_body_bytes"))] = _SERVE["max_body_bytes"].default,
    timeout: Annotated[float, typer.Option(help="Per-request timeout in seconds (504 beyond).",
                                           **_bounds("timeout_s"))] = _SERVE["timeout_s"].default,
    poll: Annotated[float, typer.Option(help="Seconds between registry alias checks (hot reload); 0: off.",
                                        **_bounds("poll_s"))] = _SERVE["poll_s"].default,
) -> None:
    """Serve micro-models (and the base model) behind one OpenAI-compatible API: /v1/chat/completions, /v1/completions, /v1/models.

    Classify, extract and generate micro-models answer the last user message; a chat micro-model the whole conversation."""
    from microtune import pipeline
    from microtune.serving import parse_adapter_options

    def run_server() -> None:
        pipeline.serve(parse_adapter_options(adapter or []), api_key_file=api_key_file, reporter=_reporter(), base=base,
                       registry=registry, tracking_uri=tracking_uri, workspace=workspace, host=host, port=port,
                       max_loaded=max_loaded, max_memory_mb=max_memory_mb, qlora_base=qlora_base.value, max_batch=max_batch,
                       batch_window_ms=batch_window_ms, max_queue=max_queue,
                       max_tokens=max_tokens, max_body_bytes=max_body_bytes, timeout_s=timeout, poll_s=poll)

    _guard(run_server)


@app.command()
def studio(
    workspace: WorkspaceOpt = None,
    host: Annotated[str, typer.Option(help="Interface to listen on; 0.0.0.0 exposes the Studio to the network (set API keys first).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.", min=0, max=65535)] = 8765,
    api_key_file: Annotated[Path | None, typer.Option(help="Accepted API keys, one per line (plus $MICROTUNE_API_KEYS), as for serve; "
                                                           "with keys set every page and action needs one.")] = None,
    max_jobs: Annotated[int, typer.Option(min=1, help="Launched jobs that may run at once in the workspace.")] = 1,
) -> None:
    """Open the workspace in a browser: scoreboard, model versions and gate decisions (promote, rollback), runs with loss
    curves, cost and the eval report, data checks and synth runs, watch drift, a playground over the serving engine,
    and launching run/train/eval/synth as background jobs with live progress."""
    from microtune.serving import read_api_keys
    from microtune.studio import run_studio

    def start() -> None:
        keys = read_api_keys(api_key_file)
        if host not in ("127.0.0.1", "localhost", "::1") and not keys:
            err.print(f"[bold yellow]warning:[/] the Studio listens on {host} without API keys: anyone who reaches the port can "
                      "promote models and start jobs (set $MICROTUNE_API_KEYS or --api-key-file)")
        err.print(f"microtune studio on http://{host}:{port} (workspace {Path(workspace or '.microtune').resolve()}); Ctrl-C stops it")
        run_studio(workspace, host, port, keys, max_jobs)

    _guard(start)


@app.command()
def demo(set_: SetOpt = None, workspace: WorkspaceOpt = None) -> None:
    """Run the bundled example recipe (banking intents, CLINC150 slice) end to end."""
    recipe = demo_recipe()
    out.print(f"[bold]demo:[/] {recipe}")
    _run(recipe, set_, workspace)


@app.command()
def watch(recipe: RecipeArg, set_: SetOpt = None, workspace: WorkspaceOpt = None,
          once: Annotated[bool, typer.Option("--once", help="One cycle, then exit (for cron, Airflow, Prefect).")] = False,
          every: Annotated[str | None, typer.Option(help="Loop: a cycle every 30s / 10m / 1h / 1d until SIGTERM or Ctrl-C.")] = None,
          ) -> None:
    """Ingest new files from watch.inbox; on new data or drift retrain, gate and promote the winner."""
    from microtune import pipeline

    if once == (every is not None):
        err.print("[bold red]error:[/] give exactly one of --once or --every DURATION")
        raise typer.Exit(2)
    if once:
        with _reporter() as report:
            cycle = _guard(lambda: pipeline.watch(recipe, set_, workspace, reporter=report))
        _show_watch(cycle)
        return
    seconds = _duration(every or "")
    with _reporter() as report:
        cycles = _guard(lambda: pipeline.watch_loop(recipe, seconds, set_, workspace, report))
    err.print(f"watch: stopped cleanly after {cycles} cycle(s)")


def _duration(text: str, option: str = "--every") -> float:
    """``30s`` / ``10m`` / ``1h`` / ``1d`` in seconds (`watch --every`, `tune --budget`); anything else exits 2."""
    import re

    found = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if not found:
        err.print(f"[bold red]error:[/] {option} {text!r} is not a duration\n[bold]fix:[/] write e.g. 30s, 10m, 1h or 1d")
        raise typer.Exit(2)
    return float(found.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[found.group(2)]


def _show_watch(report: dict[str, Any]) -> None:
    stats = report["statistics"]
    out.print(f"new rows: {stats['new_rows']} (reference {stats['reference_rows']}); "
              f"files: {len(report['files'])} new; triggers: {'; '.join(report['fired']) or 'none'}", highlight=False, markup=False)
    if stats.get("champion_quality"):
        q = stats["champion_quality"]
        out.print(f"champion (version {q['version']}) {q['metric']} on the new rows: {q['value']:.3f} ({q['rows']} rows)", highlight=False)
    if report.get("round"):
        r = report["round"]
        out.print(f"round {r['id']}: version {r['version']} {r['verdict']} — {r['reason']}", highlight=False, markup=False)


@app.command()
def tune(recipe: RecipeArg, set_: SetOpt = None, workspace: WorkspaceOpt = None,
         budget: Annotated[str | None, typer.Option(help="Wall time, 30s / 20m / 2h: no trial starts after it and a running one stops "
                                                      "at its next step (the first trial to complete always finishes).")] = None,
         trials: Annotated[int | None, typer.Option(min=1, help="Trials the study should hold in all (a rerun continues to N).")] = None,
         workers: Annotated[int, typer.Option(min=1, help="Processes running trials of the study on this machine.")] = 1,
         storage: Annotated[str | None, typer.Option(help="Optuna RDB storage shared by the workers: sqlite:///…, postgresql://… "
                                                          "\\[default: sqlite:///<workspace>/<recipe>/tune/study.db]")] = None,
         study: Annotated[str | None, typer.Option(help="Study name (resume it, or share it across machines). \\[default: the recipe name]")] = None,
         tracker: TrackerOpt = None) -> None:
    """Search hyper-parameters (recipe `tune:` space; Optuna TPE, pruning) scored on the valid split; writes RECIPE.tuned.yaml.

    Valid too small to tell settings apart? --set tune.holdout=0.15: trials score on valid + 15 % of train, held out.

    The tuned recipe still trains on all of train; the test split is never read."""
    from microtune import pipeline

    set_ = _tracked(set_, tracker)
    seconds = _duration(budget, "--budget") if budget is not None else None
    if seconds is None and trials is None:
        err.print("[bold red]error:[/] give --trials N and/or --budget DURATION\n[bold]fix:[/] e.g. --budget 20m, or --trials 30")
        raise typer.Exit(2)
    with _reporter() as report:
        result = _guard(lambda: pipeline.tune(recipe, set_, workspace, report, trials=trials, budget_s=seconds, workers=workers,
                                              storage=storage, study=study))
    _show_tune(result)


def _show_tune(result: Any) -> None:
    import csv

    rows = list(csv.DictReader((result.folder / "trials.csv").open(encoding="utf-8")))
    params = [c for c in (rows[0] if rows else {}) if c not in ("number", "state", "value", "valid_loss", "last_step", "seconds", "from_recipe")]
    table = Table("trial", "state", f"valid {result.metric}", "valid loss", "step", *params, title=f"study {result.study} ({result.storage})")
    for row in rows:
        number = row["number"] + (" (recipe)" if row.get("from_recipe") else "")
        table.add_row(number, row["state"].lower(), _short(row["value"]), _short(row["valid_loss"]), row["last_step"] or "-",
                      *(_short(row[p]) for p in params))
    out.print(table)
    if result.importances:
        out.print("parameter importances: " + ", ".join(f"{k} {v:.2f}" for k, v in result.importances.items()), highlight=False)
    if result.tuned_recipe is None:
        out.print("no trial completed: nothing to write (see the trials above)", highlight=False)
        return
    out.print(f"best: valid {result.metric} {result.best_value:.4f} with {' '.join(result.overrides) or 'the recipe as it is'}",
              highlight=False, markup=False, soft_wrap=True)
    out.print(f"tuned recipe: {result.tuned_recipe}\ntrials, importances, history.png: {result.folder}", highlight=False, markup=False,
              soft_wrap=True)


def _short(text: str) -> str:
    """A drawn value as a table cell: floats to 4 significant digits."""
    try:
        return text if float(text).is_integer() and "." not in text else f"{float(text):.4g}"
    except ValueError:
        return text or "-"


models_app = typer.Typer(help="Registered micro-models: versions, metrics, the champion/challenger aliases.", no_args_is_help=True)
app.add_typer(models_app, name="models")
NameArg = Annotated[str, typer.Argument(help="Registered model name (the recipe name).", show_default=False)]


@models_app.command("list")
def models_list(name: Annotated[str | None, typer.Argument(help="Show the versions of this model. [default: every model]",
                                                          show_default=False)] = None,
                workspace: WorkspaceOpt = None) -> None:
    """Registered models, or one model's versions with their metrics and aliases."""
    from microtune import pipeline

    if name is None:
        table = Table("model", "versions", "champion", title="registered micro-models")
        for m in _guard(lambda: pipeline.list_models(workspace)):
            table.add_row(m.name, str(m.versions), m.champion or "-")
        out.print(table)
        return
    _show_versions(name, _guard(lambda: pipeline.list_versions(name, workspace)))


@models_app.command("show")
def models_show(name: NameArg, version: Annotated[str | None, typer.Argument(help="[default: the champion]")] = None,
                workspace: WorkspaceOpt = None) -> None:
    """One version: aliases, metrics, lineage tags and the last gate decision."""
    from microtune import pipeline

    v = _guard(lambda: pipeline.show_version(name, version, workspace))
    out.print(f"[bold]{name}[/] version {v.version}  aliases: {', '.join(v.aliases) or '-'}")
    out.print(f"  source: {v.source}", highlight=False, markup=False, soft_wrap=True)
    for key in sorted(v.tags):
        out.print(f"  {key}: {v.tags[key]}", highlight=False, markup=False, soft_wrap=True)


@models_app.command("promote")
def models_promote(name: NameArg, version: Annotated[str, typer.Argument(help="The version to make champion.", show_default=False)],
                   reason: Annotated[str, typer.Option(help="Why (recorded with the decision).")] = "manual promotion",
                   workspace: WorkspaceOpt = None) -> None:
    """Make VERSION the champion by hand (bypasses the gate; the decision is recorded as manual)."""
    from microtune import pipeline

    decision = _guard(lambda: pipeline.promote(name, version, reason, workspace))
    out.print(f"{name}: champion {decision.champion or '-'} → {decision.challenger}")


@models_app.command("rollback")
def models_rollback(name: NameArg, workspace: WorkspaceOpt = None) -> None:
    """Move the champion back to the version the current champion replaced."""
    from microtune import pipeline

    v = _guard(lambda: pipeline.rollback(name, workspace))
    out.print(f"{name}: champion is version {v.version} again")


def _show_versions(name: str, versions: list[Any]) -> None:
    metric_names = sorted({k for v in versions for k in v.metrics})[:5]
    table = Table("version", "aliases", *metric_names, "gate", "created", title=f"{name}: versions")
    for v in versions:
        table.add_row(v.version, ", ".join(v.aliases) or "-", *(f"{v.metrics[m]:.4f}" if m in v.metrics else "-" for m in metric_names),
                      v.tags.get("gate.verdict", "-"), time.strftime("%Y-%m-%d %H:%M", time.localtime(v.created)))
    out.print(table)


@app.command("recipe-schema")
def recipe_schema() -> None:
    """Print the JSON schema of a recipe (every field with its description)."""
    from microtune.config import recipe_schema as schema

    out.print_json(json.dumps(schema()))


@app.command()
def version() -> None:
    """Print the microtune version."""
    out.print(__version__)


def _run(recipe: Path, set_: list[str] | None, workspace: Path | None) -> None:
    from microtune import pipeline

    checked = _guard(lambda: pipeline.check(recipe, set_, workspace))
    _show_check(checked.manifest, checked.dataset_dir)
    with _reporter() as report:
        result = _guard(lambda: pipeline.run(recipe, set_, workspace, report))
    _show_adapter(result.adapter_dir)
    _show_eval(result.eval_dir)
    if result.decision is not None:
        d = result.decision
        colour = "green" if d.verdict == "promote" else "yellow"
        out.print(f"gate: [{colour}]{d.verdict}[/] version {d.challenger} — {escape(d.reason)}")
    if result.model_version:
        out.print(f"registered [bold]{result.recipe.name}[/] version {result.model_version} in MLflow "
                  f"(browse: mlflow ui --backend-store-uri {_store_hint(result.recipe, workspace)})")


def _store_hint(recipe: Any, workspace: Path | None) -> str:
    from microtune.core.workspace import Workspace
    from microtune.registry.tracking import tracking_uri

    return tracking_uri(recipe, Workspace.at(workspace))


def demo_recipe() -> Path:
    """The bundled demo recipe: inside the installed package, or the repository's recipes/ folder."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_recipes" / "banking-intents.yaml", here.parents[1] / "recipes" / "banking-intents.yaml"):
        if candidate.is_file():
            return candidate
    raise typer.BadParameter("the demo recipe is not installed; run from a microtune checkout")


def _show_check(manifest: dict[str, Any], folder: Path) -> None:
    stats = manifest["stats"]
    table = Table(title=f"dataset {manifest['recipe']} ({folder})", show_header=True)
    table.add_column("label")
    for split in ("train", "valid", "test"):
        table.add_column(split, justify="right")
    for label in manifest["labels"]:
        table.add_row(label, *(str(stats["per_label"][s].get(label, 0)) for s in ("train", "valid", "test")))
    table.add_row("[bold]rows", *(f"[bold]{stats['rows'][s]}" for s in ("train", "valid", "test")))
    out.print(table)
    tokens = stats.get("train_tokens", {})
    out.print(f"train tokens per example: p50 {tokens.get('p50')}, p90 {tokens.get('p90')}, p99 {tokens.get('p99')}, "
              f"max {tokens.get('max')}; share receiving loss {stats.get('loss_token_share', 0):.1%}")
    out.print(f"duplicates within split: {stats['duplicates']}; overlap with train: {stats['overlap_with_train']}")
    for warning in manifest.get("warnings", []):
        err.print("[yellow]warning:[/] " + escape(warning), highlight=False, soft_wrap=True)


def _show_chosen(chosen: dict[str, Any]) -> None:
    """The `auto` training settings and the values the data gave them (training/defaults.py)."""
    for path, choice in chosen.items():
        out.print(f"{path} = {choice.value} (auto: {escape(choice.why)})", highlight=False, soft_wrap=True)


def _show_exports(exports: dict[str, str | None]) -> None:
    """Which `microtune export` formats a micro-model of this recipe will get, and for the others why not and the fix."""
    for fmt, refused in exports.items():
        verdict = "yes" if refused is None else f"no — {escape(refused)}"
        out.print(f"export --{fmt}: {verdict}", highlight=False, soft_wrap=True)


def _show_synth(folder: Path) -> None:
    from microtune.core.artifacts import read_manifest

    m = read_manifest(folder, "synthetic")
    usage, fid = m["usage"], m["fidelity"]
    table = Table(title=f"filter cascade ({folder})")
    for col in ("stage", "entered", "rejected", "pass rate"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for stage, row in m["filters"].items():
        if isinstance(row, dict):
            rate = "—" if row["pass_rate"] is None else f"{row['pass_rate']:.1%}"
            table.add_row(stage, "—" if row["entered"] is None else str(row["entered"]), str(row["rejected"]), rate)
    out.print(table)
    out.print(f"accepted {m['accepted']} rows {m['accepted_per_stratum']}; rejected {m['rejected']} (reasons in rejected.jsonl)")
    short = {k: f"{m['accepted_per_stratum'].get(k, 0)}/{n}" for k, n in m["plan"]["quota"].items() if m["accepted_per_stratum"].get(k, 0) < n}
    if short:
        strata = m["plan"].get("strata") or "labels"  # classify: labels; extract: filled fields; generate: one group
        err.print(f"[yellow]warning:[/] {len(short)} of the {strata} below quota (accepted/wanted): {escape(str(short))}; see rejected.jsonl, "
                  "then raise synth.oversample or fix the cause (a rerun asks only for what is not cached)", highlight=False, soft_wrap=True)
    out.print(f"teacher {m['teacher']['model']}: {usage['requests']} requests, {usage['sent']} sent, {usage['from_cache']} from cache, "
              f"{usage['failed']} failed, {usage['retries']} retries; {usage['prompt_tokens']:,} prompt + "
              f"{usage['completion_tokens']:,} completion tokens, ${usage['cost_usd']:.4f}")
    auc = "n/a" if fid["auc"] is None else f"{fid['auc']:.3f}"
    verdict = "[bold green]PASSED[/]" if fid["passed"] else "[bold red]FAILED[/] (train will refuse to mix it)"
    out.print(f"fidelity {verdict}: real-vs-synthetic AUC {auc} (gate ≤ {fid['max_auc']}); report: {folder / 'fidelity.html'}")


def _show_adapter(folder: Path) -> None:
    from microtune.core.artifacts import read_manifest

    m = read_manifest(folder, "adapter")
    cost, final = m["cost"], m["final"]
    valid = f", valid loss {final['valid_loss']:.4f}" if final.get("valid_loss") is not None else ""
    out.print(f"adapter: {folder}\n  train loss {final['train_loss']:.4f}{valid}; {final['steps']} steps; "
              f"trainable {cost['trainable_params']:,} of {cost['total_params']:,} params "
              f"({cost['trainable_params'] / cost['total_params']:.2%}); {cost['tokens_seen']:,} tokens in "
              f"{cost['wall_time_s']:.0f}s; peak memory {cost['peak_memory_mb']:.0f} MB")
    if m.get("synthetic"):
        syn = m["synthetic"]
        out.print(f"  trained on {syn['real']} real + {syn['used']} synthetic rows (of {syn['available']}, cap {syn['max_ratio']}× real) "
                  f"from {syn['artifact']}", highlight=False)


def _show_eval(folder: Path) -> None:
    from microtune.core.artifacts import read_json, read_manifest

    m = read_manifest(folder, "eval")
    metrics: dict[str, Any] = m["metrics"]
    first = next(iter(metrics.values()))
    names = m.get("metric_names") or [k for k in ("accuracy", "macro_f1") if k in first]
    names = [*names, *(["valid_rate"] if "valid_rate" not in names and "valid_rate" in first else [])]
    stats = read_json(folder / "stats.json") if (folder / "stats.json").is_file() else {}
    level = f"{stats.get('confidence', 0.95):.0%}"
    # names stay whole on an 80-column log: an interval wraps below its value instead
    width = max(len(s) for s in metrics)
    quality = Table(title=f"test split: micro-model vs baselines, {level} bootstrap intervals ({folder})")
    quality.add_column("system", no_wrap=True, min_width=width)
    for name in [*names, "p vs micro"]:
        quality.add_column(name, justify="right", min_width=len(name))
    speed = Table(title="speed and cost")
    speed.add_column("system", no_wrap=True, min_width=width)
    for name in ("examples/s", "latency p50 ms", "p95 ms", "USD per 1k"):
        speed.add_column(name, justify="right")
    for system, values in metrics.items():
        style = "bold green" if system == "micro" else ""
        p = values.get("p_value_vs_micro")
        quality.add_row(system, *(_with_ci(values, n) for n in names), "" if p is None else ("<0.001" if p < 0.001 else f"{p:.3f}"),
                        style=style)
        speed.add_row(system, f"{values['examples_per_s']:.1f}", _num(values.get("latency_ms_p50"), 0),
                      _num(values.get("latency_ms_p95"), 0), _num(values.get("usd_per_1k"), 4), style=style)
    out.print(quality)
    if stats:
        out.print(speed)
        out.print(f"p vs micro: {stats['paired_test']}; latency: {stats['latency_method']}; "
                  f"report: {folder / 'report.html'}", highlight=False, markup=False, soft_wrap=True)


def _with_ci(values: dict[str, Any], name: str) -> str:
    ci = values.get("ci", {}).get(name)
    return f"{values[name]:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _num(value: float | None, digits: int) -> str:
    return "—" if value is None or value != value else f"{value:.{digits}f}"


def main() -> None:
    app()


if __name__ == "__main__":
    main()
