"""The Studio's routes: server-rendered pages (Jinja2, autoescaped) over the workspace, actions as guarded POSTs.

Pages: ``/`` scoreboard · ``/models/NAME`` versions, lineage, gate decisions, promote/rollback · ``/runs/RECIPE/RUN``
loss curves, cost, the eval report · ``/data/RECIPE`` check report and synth runs · ``/watch/RECIPE`` inbox, drift,
rounds · ``/playground`` · ``/launch`` and ``/jobs/ID``. Every name or id in a URL is looked up (``reading``); an
unknown one is a 404 that lists what exists. Actions (promote, rollback, launch, cancel, playground) are POSTs that
need the CSRF token; promote and rollback go through ``pipeline.gate`` — the functions `microtune models` calls —
after a confirmation page with a reason field.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape

from microtune.core import templating
from microtune.core.errors import InputError, MicrotuneError
from microtune.core.workspace import Workspace
from microtune.studio import gates, reading
from microtune.studio.jobs import Jobs, launchable
from microtune.studio.playground import Playground, choices
from microtune.studio.security import COOKIE, CSP, Guard, read_form
from microtune.studio.worker import COMMANDS

HERE = Path(__file__).parent


def templates() -> Environment:
    """The Studio's templates, then core's shared set (``templating.share``: its macros, filters and the eval report's body).
    Autoescape on for every template (a ``<script>`` in a data row is shown as text); ``tojson`` for chart data."""
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True, default_for_string=True),
                      trim_blocks=True, lstrip_blocks=True)
    templating.share(env)
    env.filters["pct"] = lambda v: f"{100 * v:.1f} %" if isinstance(v, (int, float)) else "—"  # missing in an older manifest: —
    env.filters["when"] = reading.when
    env.filters["usd"] = lambda v: "—" if v is None else f"${v:.5f}"
    return env


class Studio:
    def __init__(self, workspace: str | Path | None, api_keys: list[str], max_jobs: int = 1):
        self.ws = Workspace.at(workspace)
        self.guard = Guard(api_keys)
        self.jobs = Jobs(self.ws, max_jobs)
        self.playground = Playground(self.ws)
        self.env = templates()

    def page(self, request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        html = self.env.get_template(template).render(csrf=self.guard.csrf, path=request.url.path, auth=self.guard.enabled,
                                                  recipes=reading.recipe_names(self.ws), ws=self.ws.root, **context)
        return HTMLResponse(html, status_code=status)


def create_app(workspace: str | Path | None = None, api_keys: list[str] | None = None, max_jobs: int = 1) -> FastAPI:
    studio = Studio(workspace, list(api_keys or []), max_jobs)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        studio.playground.stop()

    app = FastAPI(title="microtune studio", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.studio = studio
    _middleware(app, studio)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    _pages(app, studio)
    _actions(app, studio)
    return app


def _middleware(app: FastAPI, studio: Studio) -> None:
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return studio.page(request, "error.html", status=exc.status_code, message=f"no page at {request.url.path[:80]}" if
                           exc.status_code == 404 else str(exc.detail), hint="start from the scoreboard", problems=[])

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable) -> Response:
        if not studio.guard.allowed(request):
            response: Response = studio.page(request, "login.html", status=401, wrong=False, next=request.url.path)
        else:
            try:
                response = await call_next(request)
            except MicrotuneError as exc:  # raised inside a route: a page that says what came in and how to fix it
                response = _error(studio, request, exc)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response


def _error(studio: Studio, request: Request, exc: MicrotuneError) -> HTMLResponse:
    status = 404 if isinstance(exc, reading.NotFound) else 400
    fragment = request.headers.get("hx-request") == "true"
    return studio.page(request, "error_fragment.html" if fragment else "error.html", status=status, message=exc.message,
                       hint=exc.hint, problems=[str(p) for p in exc.problems])


def _pages(app: FastAPI, studio: Studio) -> None:
    ws = studio.ws

    @app.get("/", response_class=HTMLResponse)
    async def scoreboard(request: Request, sort: str = "name", desc: int = 0) -> Response:
        rows = reading.scoreboard(ws, sort, bool(desc))
        return studio.page(request, "scoreboard.html", rows=rows, sort=sort, desc=bool(desc), keys=list(reading.SORT_KEYS))

    @app.get("/models/{name}", response_class=HTMLResponse)
    async def model(request: Request, name: str) -> Response:
        views = reading.model_view(ws, name)
        gate_cfg = {v.version.version: _gate_config(v) for v in views}
        explained = {v.version.version: gates.explain(v.decision.get("gate_decision") or v.decision, gate_cfg[v.version.version])
                     if v.decision else [] for v in views}  # after a manual promotion: the gate's own decision, rule by rule
        return studio.page(request, "model.html", name=name, views=views, explained=explained)

    @app.get("/models/{name}/versions/{version}/{action}", response_class=HTMLResponse)
    async def confirm(request: Request, name: str, version: str, action: str) -> Response:
        if action not in ("promote", "rollback"):
            raise reading.NotFound(f"no action {action[:20]!r}", hint="promote or rollback")
        v = reading.version_of(ws, name, version)
        return studio.page(request, "confirm.html", name=name, v=v, action=action, target=v.tags.get("previous_champion"))

    @app.get("/recipes/{recipe}", response_class=HTMLResponse)
    async def recipe_page(request: Request, recipe: str) -> Response:
        reading.recipe_dir(ws, recipe)
        runs = [(r, reading._json(reading.artifact_dir(ws, recipe, "adapters", r) / "manifest.json")) for r in
                reading.artifact_ids(ws, recipe, "adapters")]
        return studio.page(request, "recipe.html", recipe=recipe, runs=runs, evals=reading.artifact_ids(ws, recipe, "evals"),
                           registered=recipe in reading.model_names(ws))

    @app.get("/runs/{recipe}/{run_id}", response_class=HTMLResponse)
    async def run(request: Request, recipe: str, run_id: str, eval: str | None = None) -> Response:
        view = reading.run_view(ws, recipe, run_id)
        chosen = eval or (view.evals[0] if view.evals else None)
        report = reading.eval_report(ws, recipe, chosen) if chosen else None
        chart = _loss_chart(view)
        return studio.page(request, "run.html", run=view, report=report, eval_id=chosen, loss_chart=chart)

    @app.get("/evals/{recipe}/{run_id}", response_class=HTMLResponse)
    async def eval_page(request: Request, recipe: str, run_id: str) -> Response:
        return studio.page(request, "eval_page.html", recipe=recipe, report=reading.eval_report(ws, recipe, run_id), eval_id=run_id)

    @app.get("/data/{recipe}", response_class=HTMLResponse)
    async def data(request: Request, recipe: str, dataset: str | None = None, synth: str | None = None) -> Response:
        datasets, synths = reading.artifact_ids(ws, recipe, "datasets"), reading.artifact_ids(ws, recipe, "synthetic")
        d = reading.dataset_view(ws, recipe, dataset or datasets[0]) if (dataset or datasets) else None
        s = reading.synth_view(ws, recipe, synth or synths[0]) if (synth or synths) else None
        return studio.page(request, "data.html", recipe=recipe, datasets=datasets, synths=synths, d=d, s=s,
                           rows_chart=_rows_chart(d) if d else None, hist_chart=_hist_chart(d) if d else None,
                           funnel_chart=_funnel_chart(s) if s else None)

    @app.get("/watch/{recipe}", response_class=HTMLResponse)
    async def watch(request: Request, recipe: str) -> Response:
        view = reading.watch_view(ws, recipe)
        charts = [_drift_chart(series) for series in view["series"]]
        return studio.page(request, "watch.html", recipe=recipe, w=view, charts=charts)

    @app.get("/playground", response_class=HTMLResponse)
    async def playground(request: Request) -> Response:
        return studio.page(request, "playground.html", choices=choices(ws))

    @app.get("/launch", response_class=HTMLResponse)
    async def launch(request: Request) -> Response:
        return studio.page(request, "launch.html", launchable=launchable(ws), commands=COMMANDS, jobs=studio.jobs.all()[:30],
                           max_jobs=studio.jobs.max_jobs)

    @app.get("/jobs/{job_id}", response_class=HTMLResponse)
    async def job(request: Request, job_id: str) -> Response:
        return studio.page(request, "job.html", p=_progress(studio, job_id))

    @app.get("/jobs/{job_id}/progress", response_class=HTMLResponse)
    async def job_progress(request: Request, job_id: str) -> Response:
        return studio.page(request, "job_progress.html", p=_progress(studio, job_id))

    @app.get("/login", response_class=HTMLResponse)
    async def login_page(request: Request) -> Response:
        return studio.page(request, "login.html", wrong=False, next="/")


def _progress(studio: Studio, job_id: str) -> dict[str, Any]:
    p = studio.jobs.progress(job_id)
    p["chart"] = {"type": "line", "data": {"labels": [s for s, _ in p["losses"]],
                                           "datasets": [{"label": "training loss", "data": [v for _, v in p["losses"]]}]},
                  "options": {"animation": False}} if p["losses"] else None
    return p


def _actions(app: FastAPI, studio: Studio) -> None:
    from microtune.pipeline.gate import promote, rollback

    ws = studio.ws

    async def form_of(request: Request) -> dict[str, str]:
        try:
            form = await read_form(request)
        except ValueError as exc:
            raise InputError(str(exc), hint="send a shorter form") from None
        if not studio.guard.csrf_ok(request, form):
            raise _Forbidden()
        return form

    @app.exception_handler(_Forbidden)
    async def forbidden(request: Request, _: Exception) -> Response:
        return studio.page(request, "error.html", status=403, message="the form's CSRF token is missing or stale",
                           hint="reload the page and submit it again", problems=[])

    @app.post("/login")
    async def login(request: Request) -> Response:
        form = await form_of(request)
        key = form.get("key", "")
        target = form.get("next", "/")
        target = target if target.startswith("/") and not target.startswith("//") else "/"
        if not studio.guard.enabled:
            return RedirectResponse(target, status_code=303)
        if not studio.guard.valid_key(key):
            return studio.page(request, "login.html", status=401, wrong=True, next=target)
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(COOKIE, key, httponly=True, samesite="strict", path="/")
        return response

    @app.post("/models/{name}/versions/{version}/promote")
    async def do_promote(request: Request, name: str, version: str) -> Response:
        form = await form_of(request)
        v = reading.version_of(ws, name, version)
        reason = form.get("reason", "").strip()
        if not reason:
            raise InputError("a promotion needs a reason", hint="say why in the reason field (it is recorded with the decision)")
        if form.get("confirm") != "yes":
            raise InputError("the promotion was not confirmed", hint="tick the confirmation box")
        promote(name, v.version, reason, ws.root)  # the CLI's verb: recorded as "manual: <reason>"
        return RedirectResponse(f"/models/{name}", status_code=303)

    @app.post("/models/{name}/versions/{version}/rollback")
    async def do_rollback(request: Request, name: str, version: str) -> Response:
        form = await form_of(request)
        reading.version_of(ws, name, version)
        if form.get("confirm") != "yes":
            raise InputError("the rollback was not confirmed", hint="tick the confirmation box")
        reason = form.get("reason", "").strip()
        if not reason:
            raise InputError("a rollback needs a reason", hint="say why in the reason field (it is recorded on the version)")
        back = rollback(name, ws.root)
        from microtune.pipeline.versions import registry_at

        registry_at(ws.root).set_model_version_tag(name, version, "rolled_back_reason", f"manual: {reason}"[:5000])
        return RedirectResponse(f"/models/{name}#v{back.version}", status_code=303)

    @app.post("/playground", response_class=HTMLResponse)
    async def ask(request: Request) -> Response:
        form = await form_of(request)
        body = await _multi(request, form)
        answers = await studio.playground.ask(form.get("text", ""), body, form.get("base") == "on")
        return studio.page(request, "answers.html", answers=answers, text=form.get("text", ""))

    @app.post("/launch")
    async def start(request: Request) -> Response:
        form = await form_of(request)
        overrides = [line for line in form.get("overrides", "").splitlines() if line.strip()]
        job = studio.jobs.start(form.get("command", ""), form.get("recipe", ""), overrides)
        return RedirectResponse(f"/jobs/{job.id}", status_code=303)

    @app.post("/jobs/{job_id}/cancel")
    async def cancel(request: Request, job_id: str) -> Response:
        await form_of(request)
        studio.jobs.cancel(job_id)
        return RedirectResponse(f"/jobs/{job_id}", status_code=303)


class _Forbidden(Exception):
    pass


async def _multi(request: Request, form: dict[str, str]) -> list[str]:
    """The ticked models (the repeated checkbox ``model``, joined by ``read_form``)."""
    return [m for m in form.get("model", "").split(",") if m]


def _gate_config(view: reading.VersionView) -> dict[str, Any]:
    adapter = view.version.tags.get("adapter_dir")
    path = Path(adapter) / "recipe.json" if adapter else None
    if path is None or not path.is_file():
        return {}
    return (json.loads(path.read_text()).get("gate") or {})


# -- chart specs (Chart.js configs, embedded as JSON and drawn by static/studio.js) -------------------------------
def _loss_chart(view: reading.RunView) -> dict[str, Any] | None:
    if not view.loss:
        return None
    sets = [{"label": "training loss", "data": [{"x": s, "y": v} for s, v in view.loss]}]
    if view.valid_loss:
        sets.append({"label": "validation loss", "data": [{"x": s, "y": v} for s, v in view.valid_loss]})
    return {"type": "line", "data": {"datasets": sets},
            "options": {"animation": False, "parsing": True, "scales": {"x": {"type": "linear", "title": {"display": True, "text": "step"}}}}}


def _rows_chart(d: dict[str, Any]) -> dict[str, Any] | None:
    per = d["stats"].get("per_label") or {}
    labels = sorted({lb for split in per.values() for lb in split})
    if not labels:
        return None
    sets = [{"label": split, "data": [per[split].get(lb, 0) for lb in labels]} for split in per if per[split]]
    return {"type": "bar", "data": {"labels": labels, "datasets": sets}, "options": {"animation": False}}


def _hist_chart(d: dict[str, Any]) -> dict[str, Any] | None:
    h = d.get("histogram")
    if not h:
        return None
    names = [f"{int(a)}–{int(b)}" for a, b in zip(h["edges"][:-1], h["edges"][1:])]
    return {"type": "bar", "data": {"labels": names, "datasets": [{"label": "train rows", "data": h["counts"]}]},
            "options": {"animation": False, "scales": {"x": {"title": {"display": True, "text": "tokens per row (prompt + answer)"}}}}}


def _funnel_chart(s: dict[str, Any]) -> dict[str, Any] | None:
    if not s["funnel"]:
        return None
    return {"type": "bar", "data": {"labels": [f["stage"] for f in s["funnel"]],
                                    "datasets": [{"label": "entered", "data": [f.get("entered", 0) for f in s["funnel"]]},
                                                 {"label": "rejected", "data": [f.get("rejected", 0) for f in s["funnel"]]}]},
            "options": {"animation": False}}


def _drift_chart(series: dict[str, Any]) -> dict[str, Any]:
    labels = [p["at"] for p in series["points"]]
    return {"name": series["name"], "rule": series["rule"], "threshold_key": series["threshold_key"], "points": series["points"],
            "spec": {"type": "line", "data": {"labels": labels, "datasets": [
                {"label": series["name"], "data": [p["value"] for p in series["points"]]},
                {"label": f"threshold ({series['threshold_key']})", "data": [p["threshold"] for p in series["points"]], "borderDash": [4, 4]}]},
                "options": {"animation": False}}}


