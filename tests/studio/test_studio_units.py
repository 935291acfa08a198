"""The Studio's pure pieces without a browser (fast, not marked slow): the gate explained rule by rule, the name/id
lookups (unknown → 404 listing what exists; a ``../`` or absolute name never reaches the filesystem), CSRF, the key
guard (bearer header and sign-in cookie), the one-job limit, and the eval report embedded from the shared templates.

HTTP tests run the real app under uvicorn on 127.0.0.1 (as tests/serve_helpers.py does) and talk to it with urllib:
no httpx, no browser. The workspace is a few hand-written artifact folders: nothing is trained here."""
from __future__ import annotations

import dataclasses
import http.cookiejar
import json
import os
import re
import socket
import stat
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from microtune.core.errors import InputError
from microtune.core.workspace import Workspace
from microtune.registry.gate import ClassicalMargin, Evidence, decide
from microtune.studio import gates, reading
from microtune.studio.jobs import Busy, Jobs

KEY = "unit-key"


# -- gates.explain ---------------------------------------------------------------------------------
def _decision(**changes: Any) -> dict[str, Any]:
    """A real decision from registry.gate.decide: champion 0.80, challenger 0.90 on 100 rows, every rule passing unless
    ``changes`` (challenger metrics, p_value, recall, flips, cfg fields, classical) make one fail."""
    from microtune.config import GateConfig

    cfg = GateConfig(**changes.pop("cfg", {}))
    challenger = {"accuracy": 0.90, "valid_rate": 1.0, "latency_ms_p50": 10.0} | changes.pop("challenger", {})
    ev = Evidence(main_metric="accuracy", champion={"accuracy": 0.80, "valid_rate": 1.0, "latency_ms_p50": 10.0}, challenger=challenger,
                  p_value=changes.pop("p_value", 0.001), test="McNemar", examples=100,
                  recall=changes.pop("recall", {"champion": {"a": 0.8, "b": 0.8}, "challenger": {"a": 0.9, "b": 0.9}}),
                  flips=changes.pop("flips", {}))
    return dataclasses.asdict(decide("toy", "1", "2", ev, cfg, changes.pop("classical", None)))


def _statuses(decision: dict[str, Any]) -> list[str]:
    return [r.status for r in gates.explain(decision)]


def test_a_promotion_passes_every_rule() -> None:
    decision = _decision()
    assert decision["verdict"] == "promote"
    rules = gates.explain(decision)
    assert [r.status for r in rules] == ["passed"] * 5
    assert "0.8 → 0.9" in rules[0].figure and "p = 0.001 on 100 rows" in rules[1].figure


@pytest.mark.parametrize("changes, failed_at", [
    ({"challenger": {"accuracy": 0.79}}, 0),                                             # gain below min_gain
    ({"challenger": {"accuracy": 0.80}}, 0),                                             # a tie: not above 0
    ({"p_value": 0.2}, 1),                                                               # not significant
    ({"recall": {"champion": {"a": 1.0}, "challenger": {"a": 0.5}}, "flips": {"a": (10, 0)}}, 2),  # recall falls (…"0 gained")
    ({"challenger": {"valid_rate": 0.5}}, 3),                                            # valid answers fall
    ({"challenger": {"latency_ms_p50": 100.0}}, 4),                                      # p50 latency
])
def test_the_failing_rule_is_marked_and_later_ones_not_reached(changes: dict[str, Any], failed_at: int) -> None:
    decision = _decision(**changes)
    assert decision["verdict"] == "reject"
    assert _statuses(decision) == ["passed"] * failed_at + ["failed"] + ["not reached"] * (4 - failed_at), decision["reason"]


def test_the_classical_guard_fails_first_when_required_and_is_recorded_only_when_off() -> None:
    weak = ClassicalMargin("accuracy", micro=0.90, classical=0.95, p_value=0.01, examples=100, source="test")
    required = _decision(classical=weak, cfg={"beat_classical": True})
    assert required["verdict"] == "reject" and _statuses(required) == ["failed"] + ["not reached"] * 5
    assert gates.explain(required)[0].threshold.startswith("margin > 0")
    off = _decision(classical=weak)
    assert off["verdict"] == "promote" and _statuses(off) == ["off"] + ["passed"] * 5


def test_a_rejection_no_rule_words_is_shown_as_its_own_failed_row() -> None:
    rules = gates.explain({"verdict": "reject", "reason": "the champion's eval folder is missing", "details": {}})
    assert [(r.name, r.figure, r.status) for r in rules] == [("the gate's reason", "the champion's eval folder is missing", "failed")]


def test_the_thresholds_come_from_the_versions_gate_section() -> None:
    rules = gates.explain(_decision(), {"recall_drop": 0.3, "latency_ratio": 2.0})
    assert "drop ≤ 0.3" in rules[2].threshold and "≤ 2.0×" in rules[4].threshold


# -- a small hand-made workspace -------------------------------------------------------------------------
@pytest.fixture
def ws(tmp_path: Path, make_recipe: Any) -> Workspace:
    """Recipe `toy` with one dataset, one adapter (its recipe.json, so it is launchable) and one eval folder; a file
    outside the workspace that a `../` name would reach if a name were ever joined into a path."""
    from microtune.config import load_recipe
    from microtune.pipeline.recipes import recipe_json

    root = tmp_path / "ws"
    dataset = root / "toy" / "datasets" / "abcdef123456"
    adapter = root / "toy" / "adapters" / "run-1"
    for folder in (dataset, adapter):
        folder.mkdir(parents=True)
    (dataset / "manifest.json").write_text(json.dumps({"stats": {"rows": {"train": 3}}, "warnings": ["train.jsonl:2: empty text"]}))
    (adapter / "manifest.json").write_text(json.dumps({"method": "lora", "cost": {"tokens_seen": 12}}))
    (adapter / "recipe.json").write_text(recipe_json(load_recipe(make_recipe(tmp_path / "no-model"))))
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "manifest.json").write_text(json.dumps({"method": "SECRET-OUTSIDE"}))
    return Workspace.at(root)


@pytest.mark.parametrize("name", ["../../../secret", "/etc", str(Path("/tmp")), "..", ".", "run-1/../../../secret", ""])
def test_a_path_like_name_is_never_joined_into_a_path(ws: Workspace, name: str) -> None:
    with pytest.raises(reading.NotFound) as err:
        reading.artifact_dir(ws, "toy", "adapters", name)
    assert "run-1" in err.value.hint  # the 404 lists what exists
    with pytest.raises(reading.NotFound):
        reading.recipe_dir(ws, name)


def test_lookups_find_what_exists_and_list_it_when_not(ws: Workspace) -> None:
    assert reading.artifact_dir(ws, "toy", "adapters", "run-1") == ws.root / "toy" / "adapters" / "run-1"
    with pytest.raises(reading.NotFound) as err:
        reading.recipe_dir(ws, "nope")
    assert "recipes here: toy" in err.value.hint
    with pytest.raises(reading.NotFound) as err:
        reading.require_model(ws, "toy")  # a recipe with no registry yet
    assert "none yet" in err.value.hint


def test_the_newest_artifact_comes_first_even_when_its_id_is_a_hash(ws: Workspace) -> None:
    older = ws.root / "toy" / "datasets" / "abcdef123456" / "manifest.json"
    newer = ws.root / "toy" / "datasets" / "000000aaaaaa" / "manifest.json"  # sorts first by name, yet was checked later
    newer.parent.mkdir()
    newer.write_text("{}")
    os.utime(older, ns=(1_000_000_000, 1_000_000_000))
    assert reading.artifact_ids(ws, "toy", "datasets") == ["000000aaaaaa", "abcdef123456"]


def test_a_registry_path_outside_the_workspace_is_not_used(ws: Workspace, tmp_path: Path) -> None:
    assert reading._inside(ws, str(tmp_path / "secret")) is None
    assert reading._inside(ws, str(ws.root / "toy" / "adapters" / ".." / ".." / ".." / "secret")) is None
    assert reading._inside(ws, str(ws.root / "toy" / "adapters" / "run-1")) == ws.root / "toy" / "adapters" / "run-1"


# -- the one-job limit (a stand-in worker: a script that sleeps, nothing trains) ----------------------------
@pytest.fixture
def sleeper(tmp_path: Path) -> str:
    """A "python" that ignores its arguments and waits: the job stays running until cancelled."""
    script = tmp_path / "fake-python"
    script.write_text("#!/bin/sh\nexec sleep 60\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_a_second_launch_is_refused_while_one_runs_and_allowed_after_cancel(ws: Workspace, sleeper: str) -> None:
    jobs = Jobs(ws, max_jobs=1, python=sleeper)
    first = jobs.start("train", "toy", ["train.epochs=1"])
    try:
        assert jobs.get(first.id).status == "running"
        with pytest.raises(Busy) as err:
            jobs.start("train", "toy", [])
        assert first.id in err.value.message and "--max-jobs" in err.value.hint
    finally:
        assert jobs.cancel(first.id).status == "cancelled"
    second = jobs.start("eval", "toy", [])
    jobs.cancel(second.id)
    assert [j.status for j in jobs.all()] == ["cancelled", "cancelled"]


def test_max_jobs_raises_the_limit(ws: Workspace, sleeper: str) -> None:
    jobs = Jobs(ws, max_jobs=2, python=sleeper)
    started = [jobs.start("train", "toy", []), jobs.start("train", "toy", [])]
    try:
        with pytest.raises(Busy):
            jobs.start("train", "toy", [])
    finally:
        for job in started:
            jobs.cancel(job.id)


def test_a_bad_launch_is_an_error_before_anything_starts(ws: Workspace, sleeper: str) -> None:
    jobs = Jobs(ws, max_jobs=1, python=sleeper)
    with pytest.raises(InputError, match="unknown command"):
        jobs.start("rm", "toy", [])
    with pytest.raises(InputError):
        jobs.start("train", "toy", ["train.epochs=many"])
    with pytest.raises(reading.NotFound):
        jobs.start("train", "../toy", [])
    assert jobs.all() == []
    with pytest.raises(InputError, match="at least 1"):
        Jobs(ws, max_jobs=0)


# -- HTTP: the real app under uvicorn ---------------------------------------------------------------------
@pytest.fixture
def studio(ws: Workspace, sleeper: str) -> Any:
    import uvicorn

    from microtune.studio import create_app

    app = create_app(ws.root, [KEY], max_jobs=1)
    app.state.studio.jobs.python = sleeper  # a launch starts the stand-in, not a training
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "the Studio did not start"
    yield f"http://127.0.0.1:{port}", app.state.studio
    for job in app.state.studio.jobs.running():
        app.state.studio.jobs.cancel(job.id)
    server.should_exit = True
    thread.join(timeout=30)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def call(url: str, data: dict[str, str] | None = None, key: str | None = KEY, cookie: str | None = None,
         follow: bool = True) -> tuple[int, str, Any]:
    """(status, body, headers) of a GET (or a form POST with ``data``); errors are answers, not exceptions."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if cookie:
        headers["Cookie"] = cookie
    body = urllib.parse.urlencode(data).encode() if data is not None else None
    opener = urllib.request.build_opener() if follow else urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(urllib.request.Request(url, data=body, headers=headers), timeout=60) as response:
            return response.status, response.read().decode(), response.headers
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(), err.headers


def test_without_a_key_every_page_static_file_and_action_is_401(studio: Any) -> None:
    url, _ = studio
    for path, data in (("/", None), ("/data/toy", None), ("/static/studio.js", None), ("/launch", {"command": "train"}),
                       ("/jobs/x/cancel", {})):
        status, body, _ = call(url + path, data, key=None)
        assert status == 401 and "sign in" in body, path
        assert call(url + path, data, key="wrong")[0] == 401, path
    assert call(url + "/data/toy")[0] == 200  # the bearer key


def test_the_sign_in_cookie_lets_a_browser_in(studio: Any) -> None:
    url, guard = studio[0], studio[1].guard
    status, body, _ = call(url + "/login", key=None)
    assert status == 200 and guard.csrf in body  # the sign-in page is open, and carries the token
    status, body, _ = call(url + "/login", {"csrf": guard.csrf, "key": "wrong", "next": "/data/toy"}, key=None)
    assert status == 401 and "not accepted" in body
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar), _NoRedirect)
    with pytest.raises(urllib.error.HTTPError) as redirect:
        opener.open(urllib.request.Request(url + "/login", data=urllib.parse.urlencode(
            {"csrf": guard.csrf, "key": KEY, "next": "//evil.example/"}).encode()), timeout=60)
    assert redirect.value.code == 303 and redirect.value.headers["Location"] == "/"  # never off-site
    cookie = redirect.value.headers["Set-Cookie"]
    assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
    status, body, _ = call(url + "/data/toy", key=None, cookie=cookie.split(";")[0])
    assert status == 200 and "toy: data" in body


def test_an_action_without_the_csrf_token_is_403(studio: Any) -> None:
    url, s = studio
    for path in ("/launch", "/jobs/x/cancel", "/playground", "/models/toy/versions/1/promote", "/login"):
        status, body, _ = call(url + path, {"command": "train", "recipe": "toy"}, key=KEY)
        assert status == 403 and "CSRF" in body, path
        assert call(url + path, {"csrf": "stale", "command": "train"})[0] == 403, path
    assert s.jobs.all() == []  # nothing launched


def test_unknown_names_are_404_listing_what_exists(studio: Any) -> None:
    url, _ = studio
    for path, listed in (("/data/nope", "recipes here: toy"), ("/runs/toy/nope", "run-1"), ("/evals/toy/nope", "none"),
                         ("/models/nope", "none yet"), ("/jobs/nope", "/launch"), ("/runs/toy/..%2F..%2F..%2Fsecret", ""),
                         ("/runs/toy/%2Fetc", ""), ("/data/..", "")):
        status, body, _ = call(url + path)
        assert status == 404, path
        assert listed in body and "SECRET-OUTSIDE" not in body, path


def test_the_second_launch_over_http_is_refused(studio: Any) -> None:
    url, s = studio
    status, body, _ = call(url + "/launch", {"csrf": s.guard.csrf, "command": "train", "recipe": "toy", "overrides": "train.epochs=1"})
    assert status == 200 and "running" in body  # followed to the job's page
    status, body, _ = call(url + "/launch", {"csrf": s.guard.csrf, "command": "train", "recipe": "toy"})
    assert status == 400 and "already running" in body
    assert len(s.jobs.running()) == 1


def test_the_run_page_embeds_the_shared_eval_report(studio: Any, tmp_path: Path) -> None:
    """The eval section is core's eval/report_body.html (every section of report.html), not a Studio copy."""
    url, s = studio
    folder = s.ws.root / "toy" / "evals" / "run-1"
    folder.mkdir(parents=True)
    rows = [{"text": f"<script>x{i}</script>", "gold": g, "micro": {"pred": p, "prob": 0.9}, "zero_shot": {"pred": g}}
            for i, (g, p) in enumerate([("a", "a"), ("b", "a"), ("a", "a"), ("b", "b")])]
    (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = {s_: {"accuracy": acc, "ci": {"accuracy": [acc - 0.1, min(acc + 0.1, 1.0)]}} for s_, acc in (("micro", 0.75), ("zero_shot", 1.0))}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "stats.json").write_text(json.dumps({"confidence": 0.95, "interval_method": "percentile bootstrap", "n_resamples": 10,
                                                   "seed": 0, "paired_test": "McNemar", "latency_method": "-", "endpoint_latency_method": "-",
                                                   "comparisons": {"zero_shot": {"metrics": {"accuracy": {"delta": -0.25, "p_value": 0.5}}}}}))
    (folder / "manifest.json").write_text(json.dumps({"recipe": "toy", "adapter_dir": str(s.ws.root / "toy" / "adapters" / "run-1")}))
    status, body, _ = call(url + "/runs/toy/run-1")
    assert status == 200
    from microtune.core.templating import render
    from microtune.evaluation.report import report_context

    standalone = render("eval/report_body.html", report=report_context(folder))
    headings = re.findall(r'<h2 id="([^"]+)">', standalone)
    assert len(headings) == 8 and all(f'<h2 id="{h}">' in body for h in headings)
    assert "0.750 <span class=ci>[0.650, 0.850]</span>" in body  # the shared interval macro
    assert "&lt;script&gt;x1&lt;/script&gt;" in body and "<script>x1" not in body  # a worst error, escaped
    assert call(url + "/evals/toy/run-1")[0] == 200


def test_every_page_of_a_workspace_with_little_in_it_renders(studio: Any) -> None:
    """A recipe never watched, never synthesised, not registered (as `make demo` leaves every recipe but one): each page
    says so instead of failing."""
    url, _ = studio
    for path, says in (("/", "No registered micro-model"), ("/recipes/toy", "run-1"), ("/data/toy", "No synth run"),
                       ("/watch/toy", "Nothing watched yet"), ("/runs/toy/run-1", "not been evaluated"), ("/launch", "No job yet"),
                       ("/playground", "No servable micro-model")):
        status, body, _ = call(url + path)
        assert status == 200 and says in body, path
