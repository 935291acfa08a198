"""The Studio in a real browser (headless Chromium, Selenium) on a workspace made by tiny real runs: every page opens
and shows the artifacts' numbers, promote moves the MLflow alias, the playground answers through the serving engine,
a launched job's progress updates live and can be cancelled, no key → 401, a `<script>` row shows as text."""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait
from studio_workspace import SCRIPT_LINE

from conftest import KEY
from toydata import LABELS

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def shot(driver: Any, name: str) -> Path:
    """A screenshot of the page under the session's temporary folder (the README's come from a real workspace instead:
    scripts/studio_screenshots.py)."""
    path = driver.shots / f"studio-{name}.png"
    assert driver.save_screenshot(str(path)), path
    return path


def wait(driver: Any, seconds: float = 60) -> WebDriverWait:
    return WebDriverWait(driver, seconds, poll_frequency=0.2)


def text_of(driver: Any, css: str) -> str | None:
    """An element's text read in one step inside the page: htmx may swap the element between a find and a read."""
    return driver.execute_script("const e = document.querySelector(arguments[0]); return e ? e.textContent.trim() : null", css)


def page(driver: Any, url: str, name: str) -> None:
    driver.get(url)
    wait(driver, 20).until(lambda d: d.execute_script("return document.readyState") == "complete")
    assert driver.execute_script("return window.PWNED") is None  # no data value ever ran as script
    shot(driver, name)


@pytest.fixture(scope="session")
def signed_in(browser: Any, studio_url: str) -> Any:
    browser.get(studio_url + "/")
    assert "sign in" in browser.title  # the guard answers with the sign-in page
    browser.find_element(By.ID, "key").send_keys("wrong")
    browser.find_element(By.ID, "sign-in").click()
    assert wait(browser, 20).until(EC.visibility_of_element_located((By.ID, "wrong-key")))
    browser.find_element(By.ID, "key").send_keys(KEY)
    browser.find_element(By.ID, "sign-in").click()
    wait(browser, 20).until(EC.presence_of_element_located((By.ID, "scoreboard")))
    return browser


def _runs(ws: Path) -> list[str]:
    """Finished training runs, oldest first (a cancelled job may leave a dead writer's `.tmp-*` folder)."""
    return sorted(p.name for p in (ws / "toy" / "adapters").iterdir() if (p / "manifest.json").is_file() and not p.name.startswith("."))


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _mlflow(ws: Path) -> Any:
    from microtune.registry.models import registry_client

    return registry_client(f"sqlite:///{ws / 'mlflow.db'}")


def test_without_a_key_every_page_and_action_is_401(studio_url: str) -> None:
    for path, data in (("/", None), ("/models/toy", None), ("/static/studio.js", None), ("/launch", b"command=run&recipe=toy"),
                       ("/models/toy/versions/2/promote", b"reason=x&confirm=yes")):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(urllib.request.Request(studio_url + path, data=data), timeout=30)
        assert err.value.code == 401, path
    ok = urllib.request.urlopen(urllib.request.Request(studio_url + "/models/toy", headers={"Authorization": f"Bearer {KEY}"}), timeout=30)
    assert ok.status == 200 and "Content-Security-Policy" in ok.headers
    with pytest.raises(urllib.error.HTTPError) as err:  # a key but no CSRF token: the action is refused
        urllib.request.urlopen(urllib.request.Request(studio_url + "/models/toy/versions/2/promote", data=b"reason=x&confirm=yes",
                                                      headers={"Authorization": f"Bearer {KEY}"}), timeout=30)
    assert err.value.code == 403


def test_scoreboard_shows_the_champions_numbers(signed_in: Any, studio_url: str, studio_ws: dict[str, Path]) -> None:
    ws = studio_ws["ws"]
    page(signed_in, studio_url + "/", "scoreboard")
    champion = next(v for v in _mlflow(ws).search_model_versions("name='toy'") if str(v.version) == "1")
    metrics = _json(Path(champion.tags["eval_dir"]) / "metrics.json")
    row = signed_in.find_element(By.CSS_SELECTOR, "tr[data-model='toy']")
    assert float(row.find_element(By.CSS_SELECTOR, ".metric").get_attribute("data-value")) == pytest.approx(metrics["micro"]["accuracy"])
    best = max((s for s in metrics if s not in ("micro", "classical")), key=lambda s: metrics[s]["accuracy"])
    assert float(row.find_element(By.CSS_SELECTOR, ".baseline").get_attribute("data-value")) == pytest.approx(metrics[best]["accuracy"])
    lo, hi = metrics["micro"]["ci"]["accuracy"]
    assert f"[{lo:.3f}, {hi:.3f}]" in row.text and "reject" in row.text  # the newest verdict: the watch round's
    signed_in.find_element(By.LINK_TEXT, "USD / 1k predictions").click()  # sortable
    assert "sort=cost" in signed_in.current_url


def test_run_page_shows_loss_cost_and_the_eval_report(signed_in: Any, studio_url: str, studio_ws: dict[str, Path]) -> None:
    ws = studio_ws["ws"]
    run_id = _runs(ws)[0]
    manifest = _json(ws / "toy" / "adapters" / run_id / "manifest.json")
    page(signed_in, f"{studio_url}/runs/toy/{run_id}", "run")
    assert signed_in.find_element(By.ID, "tokens-seen").text == str(manifest["cost"]["tokens_seen"])
    history = _mlflow(ws).get_metric_history(manifest["mlflow_run_id"], "loss")
    shown = [float(td.get_attribute("textContent")) for td in signed_in.find_elements(By.CSS_SELECTOR, "#loss-points td")]
    assert shown == [m.value for m in sorted(history, key=lambda m: m.step)] and len(shown) >= 2
    assert signed_in.execute_script("return document.querySelectorAll('canvas[data-drawn]').length") >= 1  # the curve is drawn
    metrics = _json(ws / "toy" / "evals" / run_id / "metrics.json")
    report = signed_in.find_element(By.CSS_SELECTOR, f".eval-report[data-eval='{run_id}']")  # core's eval/report_body.html
    summary = report.find_element(By.XPATH, ".//h2[@id='summary']/following-sibling::table[1]")
    micro = summary.find_element(By.XPATH, ".//tr[td/b='micro']/td[2]").text  # accuracy [low, high]
    lo, hi = metrics["micro"]["ci"]["accuracy"]
    assert micro == f"{metrics['micro']['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]"
    headings = [h.text for h in report.find_elements(By.TAG_NAME, "h2")]
    assert headings == ["Summary", "Metric intervals", "Paired tests", "Per-class F1", "Confusion matrix", "Confidence and calibration",
                        "Worst errors", "Latency"]  # exactly the sections of the eval's own report.html
    assert len(report.find_elements(By.CSS_SELECTOR, "img[src^='data:image/png']")) >= 4  # intervals, F1, confusion, calibration
    assert "full fine-tune" in signed_in.find_element(By.TAG_NAME, "main").text


def test_model_page_explains_the_gate_and_promote_moves_the_alias(signed_in: Any, studio_url: str, studio_ws: dict[str, Path]) -> None:
    ws = studio_ws["ws"]
    page(signed_in, studio_url + "/models/toy", "model")
    v2 = signed_in.find_element(By.ID, "v2")
    decision = _json(ws / "toy" / "decisions" / "v2.json")
    assert decision["reason"] in v2.text and "failing rule" in v2.find_element(By.CSS_SELECTOR, "tr.rule.failed").text
    assert v2.find_element(By.CSS_SELECTOR, "table.lineage").text.count(decision["details"]["test"]) == 0  # lineage ≠ decision
    assert _json(ws / "toy" / "adapters" / _runs(ws)[1] / "manifest.json")["lineage"]["recipe_hash"] in v2.text
    signed_in.find_element(By.ID, "promote-v2").click()
    wait(signed_in, 20).until(EC.presence_of_element_located((By.ID, "do-promote")))
    shot(signed_in, "promote-confirm")
    signed_in.find_element(By.ID, "reason").send_keys("hand-checked on the <b>new</b> data")
    signed_in.find_element(By.ID, "confirm").click()
    signed_in.find_element(By.ID, "do-promote").click()
    wait(signed_in, 20).until(EC.presence_of_element_located((By.CSS_SELECTOR, "#v2 [data-alias='champion']")))
    client = _mlflow(ws)
    assert str(client.get_model_version_by_alias("toy", "champion").version) == "2"
    assert client.get_model_version("toy", "2").tags["gate.reason"] == "manual: hand-checked on the <b>new</b> data"
    assert "manual: hand-checked on the <b>new</b> data" in signed_in.find_element(By.ID, "v2").text  # shown as text
    signed_in.find_element(By.ID, "rollback-v2").click()
    wait(signed_in, 20).until(EC.presence_of_element_located((By.ID, "do-rollback")))
    signed_in.find_element(By.ID, "reason").send_keys("back to v1")
    signed_in.find_element(By.ID, "confirm").click()
    signed_in.find_element(By.ID, "do-rollback").click()
    wait(signed_in, 20).until(EC.presence_of_element_located((By.CSS_SELECTOR, "#v1 [data-alias='champion']")))
    assert str(client.get_model_version_by_alias("toy", "champion").version) == "1"


def test_data_page_shows_the_check_report_and_the_synth_funnel(signed_in: Any, studio_url: str, studio_ws: dict[str, Path]) -> None:
    ws = studio_ws["ws"]
    page(signed_in, studio_url + "/data/toy", "data")
    newest = max((ws / "toy" / "datasets").iterdir(), key=lambda d: (d / "manifest.json").stat().st_mtime_ns)  # the watch round's
    assert signed_in.find_element(By.ID, "rows-per-split").get_attribute("data-dataset") == newest.name
    stats = _json(newest / "manifest.json")["stats"]
    for split, n in stats["rows"].items():
        assert signed_in.find_element(By.CSS_SELECTOR, f"#rows-per-split td[data-split='{split}']").text == str(n)
    for label in LABELS:
        cell = signed_in.find_element(By.CSS_SELECTOR, f"#per-label td[data-split='train'][data-label='{label}']")
        assert cell.text == str(stats["per_label"]["train"].get(label, 0))
    assert signed_in.find_element(By.ID, "loss-token-share").text == f"{100 * stats['loss_token_share']:.1f} %"
    assert signed_in.execute_script("return document.querySelectorAll('canvas[data-drawn]').length") >= 3  # rows, histogram, funnel
    synth = _json(next((ws / "toy" / "synthetic").iterdir()) / "manifest.json")
    funnel = signed_in.find_element(By.ID, "funnel").text
    for stage, figures in synth["filters"].items():
        assert f"{stage} {figures['entered']} {figures['rejected']}" in funnel


def test_watch_page_shows_quarantine_drift_and_rounds_and_escapes_script(signed_in: Any, studio_url: str, studio_ws: dict[str, Path]) -> None:
    page(signed_in, studio_url + "/watch/toy", "watch")
    inbox = signed_in.find_element(By.ID, "inbox").text
    assert SCRIPT_LINE in inbox  # the raw line, quoted by watch's problem report, shown as text
    assert "bad.jsonl:2: " in inbox or "bad.jsonl:2" in inbox
    assert signed_in.execute_script("return window.PWNED") is None
    report = _json(next((studio_ws["ws"] / "toy" / "watch" / "reports").iterdir()))
    psi = report["statistics"]["label_shift"]["psi"]
    assert f"{psi:.3f} ({report['thresholds']['psi_threshold']:.3f})" in signed_in.find_element(By.ID, "drift").text
    assert "round 1" in signed_in.find_element(By.ID, "rounds").text


def test_playground_answers_through_the_serving_engine(signed_in: Any, studio_url: str) -> None:
    page(signed_in, studio_url + "/playground", "playground-empty")
    signed_in.find_element(By.ID, "text").send_keys("where is my parcel <script>window.PWNED=3</script>")
    signed_in.find_element(By.ID, "ask").click()
    wait(signed_in, 120).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".answer")) == 2)
    micro, base = signed_in.find_elements(By.CSS_SELECTOR, ".answer")
    assert "failed" not in micro.get_attribute("class"), micro.text
    assert micro.find_element(By.CSS_SELECTOR, ".answer-text").text in LABELS
    probs = [float(p.text) for p in micro.find_elements(By.CSS_SELECTOR, ".prob")]
    assert len(probs) == len(LABELS), micro.text
    assert sum(probs) == pytest.approx(1.0, abs=0.01)  # the champion's three labels
    assert "failed" not in base.get_attribute("class"), base.text
    assert json.loads(base.find_element(By.CSS_SELECTOR, ".answer-text").text)["label"] in LABELS  # constrained to the label set
    assert signed_in.execute_script("return window.PWNED") is None
    shot(signed_in, "playground")


def test_a_launched_job_streams_live_progress_and_can_be_cancelled(signed_in: Any, studio_url: str, studio_ws: dict[str, Path]) -> None:
    page(signed_in, studio_url + "/launch", "launch")
    signed_in.find_element(By.ID, "command").send_keys("train")
    signed_in.find_element(By.ID, "overrides").send_keys("train.max_steps=400\ntrain.epochs=200")
    signed_in.find_element(By.ID, "start").click()
    wait(signed_in, 20).until(EC.presence_of_element_located((By.ID, "progress")))
    job_url = signed_in.current_url
    seen: set[str] = set()

    def steps(d: Any) -> bool:  # the page itself polls: the step cell changes without a reload
        step = text_of(d, "#stages tr[data-stage='train'] .step")
        if step is not None:
            seen.add(step)
        return len(seen) >= 3

    wait(signed_in, 120).until(steps)
    assert signed_in.current_url == job_url
    shot(signed_in, "job")
    again = urllib.request.Request(studio_url + "/launch", data=f"csrf={_csrf(signed_in)}&command=train&recipe=toy".encode(),
                                   headers={"Authorization": f"Bearer {KEY}"})
    with pytest.raises(urllib.error.HTTPError) as err:  # one job at a time per workspace
        urllib.request.urlopen(again, timeout=30)
    assert err.value.code == 400 and "already running" in err.value.read().decode()
    signed_in.find_element(By.ID, "cancel").click()
    wait(signed_in, 30).until(lambda d: text_of(d, "#job-state") == "cancelled")
    job_id = job_url.rsplit("/", 1)[1]
    events = (studio_ws["ws"] / ".studio" / "jobs" / job_id / "events.jsonl").read_text().splitlines()
    assert any(json.loads(e).get("kind") == "progress" for e in events)  # the log is kept


def _csrf(driver: Any) -> str:
    return json.loads(driver.find_element(By.TAG_NAME, "body").get_attribute("hx-headers"))["X-CSRF-Token"]


def test_unknown_names_are_404_and_never_paths(signed_in: Any, studio_url: str) -> None:
    for path in ("/runs/toy/..%2F..%2Fetc", "/models/nope", "/runs/toy/nope", "/jobs/..%2Fjobs"):
        signed_in.get(studio_url + path)
        assert "error" in signed_in.page_source and ("no " in signed_in.find_element(By.TAG_NAME, "h1").text or "Not Found" in
                                                     signed_in.page_source)
