"""The synth stage, top to bottom: hold out → plan → ask the teacher → filter → cap to quota → fidelity → write.

    manifest = generate(recipe, dataset_dir, labels, out_dir, cache_path)   # fills out_dir; pipeline.synth wraps it

With a ``reporter``, the teacher's answers are reported as they arrive (stage ``synth``: ``start``,
``progress`` per answer with the number from cache, ``done``; see synthesis/teacher.py).

``out_dir`` receives ``accepted.jsonl`` (rows with provenance and filter scores), ``rejected.jsonl``
(every reject with its reason code, including requests that failed after all retries),
``fidelity.json`` and ``fidelity.html``. The returned dict goes into the artifact's manifest.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from microtune.config import Recipe, SynthConfig
from microtune.core.atomic import write_json
from microtune.core.crashpoints import reach
from microtune.core.errors import RecipeError, TeacherError
from microtune.core.jsonl import write_jsonl
from microtune.core.progress import Reporter
from microtune.data import read_split
from microtune.synthesis.cache import AnswerCache, request_key
from microtune.synthesis.fidelity import fidelity, two_sample, write_html
from microtune.synthesis.filters import STAGES, Cascade, judge_messages, judge_says_no
from microtune.synthesis.plan import (
    PlannedRequest,
    build_plan,
    parse_answer,
    quota_applies,
    quotas,
    split_holdout,
    strata,
    stratum_of,
    validate_item,
    with_strata,
)
from microtune.synthesis.teacher import Answer, Teacher, TeacherRequest
from microtune.tasks import SynthHooks, get_task

Row = dict[str, Any]


def synth_config(recipe: Recipe) -> SynthConfig:
    """The recipe's synth section, once the recipe can be synthesised at all: its task type has synth hooks,
    the section is there, no filter it turns on is one the task type leaves out, and its quota options fit the
    task type (per-label quotas need labels). The synth stage's first check."""
    hooks = synth_hooks(recipe, [])
    if recipe.synth is None:
        raise RecipeError(f"recipe {recipe.name!r} has no `synth` section",
                          hint="add e.g. `synth: {per_label: 50, teacher: {base_url: http://127.0.0.1:8000/v1, model: NAME}}` "
                               "(`microtune recipe-schema` lists every synth field)")
    _filters_apply(recipe.synth, hooks)
    quota_applies(recipe.synth, hooks, recipe.task.type)
    return recipe.synth


def synth_hooks(recipe: Recipe, labels: list[str]) -> SynthHooks:
    """How the recipe's task type is synthesised (prompts, row schema, filters), or a RecipeError naming the fix."""
    hooks = get_task(recipe.task, labels).synth()
    if hooks is None:
        kind = recipe.task.type
        raise RecipeError(f"`microtune synth` does not support task.type {kind} yet (the {kind} task has no synth hooks: "
                          "its `synth()` returns None)",
                          hint="remove the `synth` section from this recipe and train on real rows only, or give the task type "
                               "synth hooks (a prompt, a row parser and its filters: see tasks/base.py SynthHooks)")
    return hooks


_TOGGLES = {"pii": "pii", "probe": "label_check", "judge": "judge"}  # filter stage → the synth.filters switch that turns it on


def _filters_apply(cfg: SynthConfig, hooks: SynthHooks) -> None:
    """A filter turned on for a task type that leaves it out would be silently ignored: refuse instead."""
    unknown = sorted(set(hooks.filters) - set(STAGES))
    if unknown:
        raise ValueError(f"the task's synth hooks name unknown filter stage(s) {unknown}; known: {', '.join(STAGES)}")
    for stage, switch in _TOGGLES.items():
        if getattr(cfg.filters, switch) and stage not in hooks.filters:
            raise RecipeError(f"synth.filters.{switch} is on, but the {stage} filter does not apply to this task type",
                              hint=f"set synth.filters.{switch}=false")


def generate(recipe: Recipe, dataset_dir: Path, labels: list[str], out_dir: Path, cache_path: Path,
             reporter: Reporter | None = None) -> dict[str, Any]:
    cfg = synth_config(recipe)
    cache = AnswerCache(cache_path)
    try:
        teacher = Teacher(cfg.teacher, cache)  # resolves the endpoint and key before any work
        hooks = synth_hooks(recipe, labels)
        train = with_strata(read_split(dataset_dir, "train"), hooks)
        real = train + read_split(dataset_dir, "valid") + read_split(dataset_dir, "test")
        holdout, pool = split_holdout(train, cfg.fidelity.holdout, cfg.seed)
        names = strata(hooks, labels, pool)  # the labels, or the task's own strata
        quota = quotas(cfg, names, pool, hooks, recipe.task.type)
        plan = build_plan(cfg, hooks, names, pool, quota)
        requests = [_request(teacher, cfg, p) for p in plan]
        answers = teacher.ask_all(requests, reporter)
        reach("synth.after_answers")
        _refuse_total_failure(answers, teacher)
        cascade = Cascade(cfg.filters, names, pool, real, cfg.seed, hooks.filters, pooled_band=hooks.stratum is not None)
        candidates = _candidates(plan, requests, answers, labels, cascade, teacher, hooks)
        kept = cascade.run(candidates)
        if cfg.filters.judge:
            kept = _judge(kept, recipe, labels, cascade, cache)
        accepted = _cap(kept, quota, cascade)
        accepted, report = _fidelity(accepted, holdout, pool, quota, cfg, cascade, hooks)
    finally:
        cache.close()
    report["filters"] = _filter_table(cascade)
    _write(out_dir, accepted, cascade.rejected, report, recipe.name)
    return {"plan": {"quota": quota, "strata": hooks.strata, "requests": len(plan), "examples_asked": sum(p.n for p in plan),
                     "attributes": cfg.attributes, "exemplars": cfg.exemplars},
            "teacher": _teacher_info(teacher), "usage": _usage(answers, cfg), "filters": report["filters"],
            "accepted": len(accepted), "accepted_per_stratum": dict(Counter(stratum_of(r) for r in accepted)),
            "rejected": len(cascade.rejected), "holdout": sorted(r["source"] for r in holdout),
            "fidelity": {"passed": report["passed"], "auc": report["two_sample"]["auc"], "max_auc": cfg.fidelity.max_auc}}


def _request(teacher: Teacher, cfg: SynthConfig, p: PlannedRequest) -> TeacherRequest:
    params = teacher.params(seed=cfg.seed * 100_000 + p.index)  # distinct seeds: two alike prompts still get two answers
    return TeacherRequest(request_key(teacher.model, params, p.messages), p.messages, params)


def _refuse_total_failure(answers: dict[str, Answer], teacher: Teacher) -> None:
    errors = [a.error for a in answers.values() if a.error]
    if answers and len(errors) == len(answers):
        raise TeacherError(f"every one of {len(answers)} request(s) to the teacher at {_clean_url(teacher.base_url)} failed; "
                           f"first: {errors[0]}",
                           hint="check that the endpoint runs (curl BASE_URL/models), that synth.teacher.model is a model it "
                                "serves and that synth.teacher.api_key_env names the variable holding a valid key; answers "
                                "received so far are cached and will not be asked again")


def _candidates(plan: list[PlannedRequest], requests: list[TeacherRequest], answers: dict[str, Answer], labels: list[str],
                cascade: Cascade, teacher: Teacher, hooks: SynthHooks) -> list[Row]:
    """Schema and label validity: every answer becomes candidate rows or rejects with a reason. A task without labels
    is checked the same way against its stratum (reason ``stratum``): the row must be of the kind the request asked for."""
    out: list[Row] = []
    units = valid = 0  # rows entering the schema check (items, or whole unparseable answers) and the label check
    key = "label" if hooks.stratum is None else "stratum"
    for p, req in zip(plan, requests):
        answer = answers[req.key]
        prov = {"request": p.index, "exemplar_ids": [r["source"] for r in p.exemplars], "attributes": p.attributes,
                "teacher": teacher.model, "prompt_hash": req.key, "cached": answer.cached, "retries": answer.retries}
        base = {"text": None, key: p.label, "provenance": prov, "scores": {}}
        if answer.error:
            cascade.reject(base, "teacher_error", answer.error)
            continue
        if answer.refusal:
            cascade.entered["refusal"] = cascade.entered.get("refusal", 0) + 1
            cascade.reject({**base, "text": answer.refusal}, "refusal", "the teacher refused (refusal field)")
            continue
        items, problem = parse_answer(answer.content)
        units += len(items) or 1
        if problem:
            cascade.reject({**base, "text": (answer.content or "")[:500]}, "schema", problem)
        for pos, item in enumerate(items):
            row, why = validate_item(item, hooks)
            valid += row is not None
            if row is None:
                cascade.reject({**base, "text": json.dumps(item)[:500]}, "schema", why or "invalid")
            elif hooks.stratum is None and row["label"] != p.label:
                detail = f"asked for {p.label!r}, got {row['label']!r}" + ("" if row["label"] in labels else " (not a task label)")
                cascade.reject({**base, "text": row["text"]}, "label", detail)
            elif hooks.stratum is not None and (got := hooks.stratum(row)) != p.label:
                cascade.reject({**base, **row}, "stratum", f"asked for {hooks.strata} {p.label!r}, got {got!r}")
            else:
                out.append({**base, **row, "source": f"synthetic:{p.index}:{pos}", "provenance": {**prov, "position": pos}, "scores": {}})
    cascade.entered.update({"schema": units, key: valid})
    return out


def _judge(rows: list[Row], recipe: Recipe, labels: list[str], cascade: Cascade, cache: AnswerCache) -> list[Row]:
    cfg = synth_config(recipe)
    judge = Teacher(cfg.teacher, cache, model=cfg.filters.judge_model)
    params = {"temperature": 0.0, "max_tokens": 4, "seed": cfg.seed}
    reqs = [TeacherRequest(request_key(judge.model, params, m), m, params)
            for m in (judge_messages(recipe.task.instruction, labels, r) for r in rows)]
    cascade.entered["judge"] = len(rows)
    answers, kept = judge.ask_all(reqs), []
    for row, req in zip(rows, reqs):
        answer = answers[req.key]
        verdict = None if answer.error else judge_says_no(answer.content)
        row["scores"]["judge"] = {True: "no", False: "yes", None: "unclear"}[verdict]
        if verdict:
            cascade.reject(row, "judge", f"judge {judge.model!r} answered {answer.content!r}")
        else:
            kept.append(row)  # an unclear or failed judgement keeps the row; its score says so
    return kept


def _cap(rows: list[Row], quota: dict[str, int], cascade: Cascade) -> list[Row]:
    """Keep the first ``quota`` rows of each stratum (plan order); the rest are recorded as surplus."""
    taken: Counter[str] = Counter()
    kept = []
    for row in rows:
        name = stratum_of(row)
        if taken[name] < quota[name]:
            taken[name] += 1
            kept.append(row)
        else:
            cascade.reject(row, "surplus", f"the quota of {quota[name]} rows for {name!r} is full")
    return kept


def _fidelity(rows: list[Row], holdout: list[Row], pool: list[Row], quota: dict[str, int], cfg: SynthConfig,
              cascade: Cascade, hooks: SynthHooks) -> tuple[list[Row], dict[str, Any]]:
    labelled = hooks.stratum is None
    report, p_synth = fidelity(holdout, pool, rows, quota, cfg.fidelity, cfg.seed, labelled=labelled)
    for row, p in zip(rows, p_synth):
        row["scores"]["p_synthetic"] = None if math.isnan(p) else round(float(p), 4)
    n_drop = math.floor(len(rows) * cfg.fidelity.drop_most_synthetic)
    if n_drop == 0 or report["two_sample"]["auc"] is None:
        return rows, report
    order = sorted(range(len(rows)), key=lambda i: -p_synth[i])
    drop = set(order[:n_drop])
    for i in sorted(drop):
        cascade.reject(rows[i], "most_synthetic", f"P(synthetic) {p_synth[i]:.3f} is among the top "
                       f"{cfg.fidelity.drop_most_synthetic:.0%} (synth.fidelity.drop_most_synthetic)")
    kept = [r for i, r in enumerate(rows) if i not in drop]
    before = {"auc": report["two_sample"]["auc"], "synthetic_rows": len(rows)}
    report, _ = fidelity(holdout, pool, kept, quota, cfg.fidelity, cfg.seed, labelled=labelled)
    # the AUC after dropping is measured on fresh folds, but the drop chose rows with these same texts:
    # report both, gate on the after-drop figure the recipe asked for
    report["before_drop"] = before
    return kept, report


def _filter_table(cascade: Cascade) -> dict[str, Any]:
    table = {}
    for stage in (*STAGES, "surplus", "most_synthetic", "teacher_error"):
        per_label = dict(cascade.counts.get(stage, {}))
        if stage not in cascade.entered and not per_label:
            continue
        entered = cascade.entered.get(stage)
        rejected = sum(per_label.values())
        table[stage] = {"entered": entered, "rejected": rejected, "per_label": per_label,
                        "pass_rate": round(1 - rejected / entered, 4) if entered else None}
    return table


def _teacher_info(teacher: Teacher) -> dict[str, Any]:
    cfg = teacher.cfg
    return {"base_url": _clean_url(teacher.base_url), "model": teacher.model, "api_key_env": cfg.api_key_env,
            "temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens, "concurrency": cfg.concurrency,
            "max_attempts": cfg.max_attempts, "retries": "openai client: exponential backoff 0.5 s doubling to 8 s, "
            "up to 25 % jitter, Retry-After honoured up to 60 s"}


def _clean_url(url: str) -> str:
    """The endpoint without user:password or query string (either may carry a credential)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.hostname + (f":{parts.port}" if parts.port else "") if parts.hostname else "",
                       parts.path, "", ""))


def _usage(answers: dict[str, Answer], cfg: SynthConfig) -> dict[str, Any]:
    sent = [a for a in answers.values() if not a.cached]
    ok_sent = [a for a in sent if a.error is None]
    cached = [a for a in answers.values() if a.cached]
    tin, tout = sum(a.prompt_tokens for a in ok_sent), sum(a.completion_tokens for a in ok_sent)
    t = cfg.teacher
    return {"requests": len(answers), "sent": len(sent), "from_cache": len(cached), "failed": sum(a.error is not None for a in sent),
            "retries": sum(a.retries for a in sent), "prompt_tokens": tin, "completion_tokens": tout,
            "cached_prompt_tokens": sum(a.prompt_tokens for a in cached),
            "cached_completion_tokens": sum(a.completion_tokens for a in cached),
            "cost_usd": round(tin / 1e6 * t.price_input_per_mtok + tout / 1e6 * t.price_output_per_mtok, 6)}


def _write(out_dir: Path, accepted: list[Row], rejected: list[Row], report: dict[str, Any], name: str) -> None:
    write_jsonl(out_dir / "accepted.jsonl", accepted)
    write_jsonl(out_dir / "rejected.jsonl", rejected)
    write_json(out_dir / "fidelity.json", report)
    write_html(report, out_dir / "fidelity.html", f"Synthetic data fidelity: {name}")


__all__ = ["generate", "synth_config", "two_sample"]
