"""watch: inbox files processed once, bad rows quarantined, triggers with their statistics, gated retrain rounds
that survive a crash without registering twice; drift statistics on crafted data."""
from __future__ import annotations

import json
import random
import shutil
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from microtune.cli import app
from microtune.data import label_shift, text_drift_auc
from toydata import write_jsonl


def test_label_shift_and_text_drift_statistics() -> None:
    ref = ["a"] * 50 + ["b"] * 50
    same = label_shift(ref, ["a"] * 25 + ["b"] * 25)
    assert same["p_value"] > 0.5 and same["psi"] < 0.01 and same["new_labels"] == {}
    moved = label_shift(ref, ["a"] * 45 + ["b"] * 5 + ["c"] * 7)
    assert moved["p_value"] < 0.001 and moved["psi"] > 0.25 and moved["new_labels"] == {"c": 7}
    # 40 rows drawn from 28 equally likely labels: PSI is large from sampling noise alone, chi-square is not significant —
    # which is why watch wants both before it calls it a shift
    many = [f"l{i}" for i in range(28) for _ in range(19)]
    noise = label_shift(many, random.Random(0).sample(many, 40))
    assert noise["psi"] > 0.25 and noise["p_value"] > 0.1
    weather = [f"rain and wind expected over the hills on day {i}" for i in range(40)]
    money = [f"my card payment number {i} failed at the bank" for i in range(40)]
    assert text_drift_auc(money, weather) > 0.95
    pool = money + weather
    random.Random(0).shuffle(pool)
    assert text_drift_auc(pool[:40], pool[40:]) < 0.75  # two random halves of the same mix


@pytest.fixture
def watched(tmp_path: Path, make_recipe, tiny_model_dir: Path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    recipe = make_recipe(tiny_model_dir, train={"max_steps": 2}, watch={
        "inbox": "inbox", "min_new_rows": 8, "new_label_min_rows": 3, "min_rows_for_tests": 100, "holdout": 0.25,
        "retrain": ["method.kind=lora", "train.max_steps=2"]})
    from microtune import pipeline

    first = pipeline.run(recipe, workspace=tmp_path / "ws")
    assert first.decision.verdict == "promote"
    return recipe, inbox, tmp_path / "ws"


def _versions(ws: Path) -> list[str]:
    from microtune.registry.models import list_versions, registry_client

    return [v.version for v in list_versions(registry_client(f"sqlite:///{ws / 'mlflow.db'}"), "toy")]


@pytest.mark.slow
def test_watch_scenario(watched) -> None:
    from microtune.pipeline.watch import watch_once

    recipe, inbox, ws = watched
    # batch 1: a few rows like the training data → below min_new_rows, no retrain
    write_jsonl(inbox / "b1.jsonl", [{"text": "where is my parcel now", "label": "shipping"},
                                    {"text": "money back for the lamp", "label": "refund"}])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"text": "the parcel never came", "label": "shipping"}]), inbox / "b1.parquet")
    r1 = watch_once(recipe, workspace=ws)
    assert r1["files"] == [{"file": str(inbox / "b1.jsonl"), "accepted": 2, "quarantined": 0},
                           {"file": str(inbox / "b1.parquet"), "accepted": 1, "quarantined": 0}]
    assert r1["fired"] == [] and "round" not in r1 and _versions(ws) == ["1"]
    # batch 3 first: malformed rows are quarantined with file:line, the good row is kept, nothing retrains
    (inbox / "b3.jsonl").write_text('{"text": "ok row about my bill", "label": "billing"}\n{"text": "no label"}\nnot json\n')
    r3 = watch_once(recipe, workspace=ws)
    assert r3["files"][0]["accepted"] == 1 and r3["files"][0]["quarantined"] == 2 and r3["fired"] == []
    report = next((ws / "toy" / "watch" / "quarantine").glob("b3.jsonl.*.txt")).read_text()
    assert f"{inbox / 'b3.jsonl'}:2: missing field 'label'" in report and f"{inbox / 'b3.jsonl'}:3:" in report
    # the same file again (same content, new name) is not processed twice
    shutil.copy(inbox / "b1.jsonl", inbox / "b1-copy.jsonl")
    assert watch_once(recipe, workspace=ws)["files"] == []
    # batch 2: a label never seen → a round: retrain on old + new rows, gate, decision recorded
    write_jsonl(inbox / "b2.jsonl", [{"text": f"the warranty on item {i} expired early", "label": "warranty"} for i in range(6)])
    r2 = watch_once(recipe, workspace=ws)
    assert any("new label 'warranty' with 6 rows" in f for f in r2["fired"])
    assert r2["round"]["version"] == "2" and r2["round"]["verdict"] in ("promote", "reject")
    round_train = (ws / "toy" / "watch" / "round-1" / "train.jsonl").read_text()
    assert "warranty" in round_train and "my card was charged twice" in round_train  # replay: old rows stay
    frozen = (ws / "toy" / "watch" / "round-1" / "test.jsonl").read_text().splitlines()
    held = [json.loads(x) for x in frozen[6:]]  # after the recipe's 6 test rows: the held-out share of the new rows
    assert held and any(r["label"] == "warranty" for r in held)
    assert not any(r["text"] in round_train for r in held)  # never trained on
    assert sorted(_versions(ws)) == ["1", "2"]
    reports = sorted((ws / "toy" / "watch" / "reports").glob("*.json"))
    assert len(reports) == 4 and "thresholds" in json.loads(reports[-1].read_text())


@pytest.mark.slow
def test_an_interrupted_round_is_finished_without_registering_twice(watched) -> None:
    from microtune.pipeline.watch import watch_once

    recipe, inbox, ws = watched
    write_jsonl(inbox / "new.jsonl", [{"text": f"gift card {i} does not work", "label": "giftcard"} for i in range(8)])
    watch_once(recipe, workspace=ws)
    assert sorted(_versions(ws)) == ["1", "2"]
    # as if killed after registering version 2 but before the round was marked done
    with sqlite3.connect(ws / "toy" / "watch" / "state.db") as con:
        con.execute("update rounds set status = 'training', version = null where id = 1")
    again = watch_once(recipe, workspace=ws)
    assert again["resumed_round"]["version"] == "2" and sorted(_versions(ws)) == ["1", "2"]
    assert "round" not in again  # the rows were already used by round 1


def test_a_watched_recipe_of_any_method_retrains_and_bad_retrain_overrides_are_refused_at_check(tmp_path: Path, make_recipe,
                                                                                               tiny_model_dir: Path) -> None:
    """watch retrains with QLoRA by default (`watch.retrain: [method.kind=qlora]`): a prompt-tuning recipe gets a valid
    QLoRA retrain recipe (its virtual-token settings dropped); retrain overrides that cannot apply are refused by `check`
    and by `watch --once` before any inbox file is taken in."""
    from microtune import pipeline

    (tmp_path / "inbox").mkdir()
    write_jsonl(tmp_path / "inbox" / "new.jsonl", [{"text": "where is my parcel now", "label": "shipping"}])
    recipe = make_recipe(tiny_model_dir, method={"kind": "prompt_tuning", "num_virtual_tokens": 4}, watch={"inbox": "inbox"})
    checked = pipeline.check(recipe, workspace=tmp_path / "ws")
    assert checked.recipe.retrain_recipe().method.kind == "qlora"
    bad = make_recipe(tiny_model_dir, method={"kind": "prompt_tuning", "num_virtual_tokens": 4},
                      watch={"inbox": "inbox", "retrain": ["train.packing=true"]})
    runner = CliRunner()
    for command in (["check", str(bad)], ["watch", str(bad), "--once"]):
        result = runner.invoke(app, [*command, "-w", str(tmp_path / "ws")])
        assert result.exit_code == 2, result.output
        assert "watch.retrain ['train.packing=true']: the recipe a retrain would use does not validate" in result.output
        assert "train.packing cannot be used with method.kind=prompt_tuning" in result.output
        assert "set watch.retrain: [] to retrain with the recipe as it is" in result.output
    assert (tmp_path / "inbox" / "new.jsonl").is_file() and not (tmp_path / "ws" / "toy" / "watch").exists()


@pytest.mark.slow
def test_watch_cli_needs_once_or_every(watched) -> None:
    recipe, _, ws = watched
    runner = CliRunner()
    both = runner.invoke(app, ["watch", str(recipe), "-w", str(ws)])
    assert both.exit_code == 2 and "exactly one of --once or --every" in both.output
    bad = runner.invoke(app, ["watch", str(recipe), "-w", str(ws), "--every", "soon"])
    assert bad.exit_code == 2 and "write e.g. 30s, 10m, 1h or 1d" in bad.output
    ok = runner.invoke(app, ["watch", str(recipe), "-w", str(ws), "--once"])
    assert ok.exit_code == 0 and "triggers: none" in ok.output


def test_watch_loop_stops_cleanly_on_sigterm(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "inbox").mkdir()
    recipe = make_recipe(tiny_model_dir, watch={"inbox": "inbox"})
    proc = subprocess.Popen([sys.executable, "-m", "microtune.cli", "watch", str(recipe), "-w", str(tmp_path / "ws"), "--every", "1s"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reports = tmp_path / "ws" / "toy" / "watch" / "reports"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(list(reports.glob("*.json")) if reports.is_dir() else []) < 2:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped cleanly after" in err and len(list(reports.glob("*.json"))) >= 2


@pytest.mark.slow
def test_champion_quality_floor_triggers_a_round(watched) -> None:
    from microtune.pipeline.watch import watch_once

    recipe, inbox, ws = watched
    quiet = ["watch.min_rows_for_tests=5", "watch.label_shift_p=1e-12", "watch.psi_threshold=100", "watch.text_drift_auc=1.0"]
    rows = [{"text": "my card was charged twice", "label": "billing"}, {"text": "where is my parcel now", "label": "shipping"},
            {"text": "money back for the lamp", "label": "refund"}, {"text": "the invoice shows a wrong amount", "label": "billing"},
            {"text": "tracking number does not work", "label": "shipping"}, {"text": "return the broken chair", "label": "refund"}]
    write_jsonl(inbox / "labelled.jsonl", rows)
    first = watch_once(recipe, [*quiet, "watch.quality_floor=0.0"], workspace=ws)
    quality = first["statistics"]["champion_quality"]
    assert quality["version"] == "1" and quality["metric"] == "accuracy" and quality["rows"] == 6
    assert 0.0 <= quality["value"] <= 1.0 and first["fired"] == []  # the value is never below 0
    shown = CliRunner().invoke(app, ["watch", str(recipe), "-w", str(ws), "--once", *(x for q in quiet for x in ("--set", q)),
                                     "--set", "watch.quality_floor=0.0"])
    assert shown.exit_code == 0 and f"champion (version 1) accuracy on the new rows: {quality['value']:.3f} (6 rows)" in shown.output
    # the same rows, a floor just above what the champion scored → a gated round
    floor = round(quality["value"] + 0.01, 4)
    second = watch_once(recipe, [*quiet, f"watch.quality_floor={floor}"], workspace=ws)
    assert second["statistics"]["champion_quality"]["value"] == pytest.approx(quality["value"])  # same champion, same rows
    assert second["fired"] == [f"champion accuracy {quality['value']:.3f} on 6 new rows < quality_floor {floor}"]
    assert second["round"]["version"] == "2" and sorted(_versions(ws)) == ["1", "2"]
    # without a floor the champion is not scored at all
    assert "champion_quality" not in watch_once(recipe, quiet, workspace=ws)["statistics"]


@pytest.mark.slow
def test_kill_9_during_a_round_then_rerun_ends_in_the_same_state(watched) -> None:
    import subprocess
    import sys
    import time

    recipe, inbox, ws = watched
    write_jsonl(inbox / "new.jsonl", [{"text": f"gift card {i} does not work", "label": "giftcard"} for i in range(8)])
    cmd = [sys.executable, "-m", "microtune.cli", "watch", str(recipe), "-w", str(ws), "--once"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    state = ws / "toy" / "watch" / "state.db"
    deadline = time.monotonic() + 240
    status = None
    while time.monotonic() < deadline and proc.poll() is None and status != "training":
        time.sleep(0.05)
        if state.exists():
            with sqlite3.connect(state) as con:
                status = next(iter(con.execute("select status from rounds order by id desc limit 1")), (None,))[0]
    proc.kill()  # SIGKILL: no handler, no cleanup
    proc.wait(timeout=60)
    assert status == "training", "the round never started before the deadline"
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    from microtune.registry.models import CHAMPION, artifact_exists, by_alias, registry_client

    client = registry_client(f"sqlite:///{ws / 'mlflow.db'}")
    assert sorted(_versions(ws)) == ["1", "2"]  # the round's version exists once
    with sqlite3.connect(state) as con:
        assert list(con.execute("select id, status, version from rounds")) == [(1, "done", "2")]
        assert list(con.execute("select count(*) from rows where round is null")) == [(0,)]
    champion = by_alias(client, "toy", CHAMPION)
    assert champion is not None and artifact_exists(champion.source)
    # a third run has nothing left to do
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "triggers: none" in again.stdout + again.stderr and sorted(_versions(ws)) == ["1", "2"]


def test_state_db_is_born_with_its_tables_even_when_many_open_it_at_once(tmp_path: Path) -> None:
    """The Studio (and a test) may read state.db the instant it appears: it never exists without its tables."""
    import threading

    from microtune.pipeline.watch import _state

    path = tmp_path / "watch" / "state.db"
    errors: list[BaseException] = []

    def open_it() -> None:
        try:
            with _state(path) as con:
                con.execute("insert into rounds (status) values ('x')")
                con.commit()
        except BaseException as err:  # noqa: BLE001 - collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=open_it) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.db"]  # no temporary file left behind
    with sqlite3.connect(path) as con:
        assert con.execute("select count(*) from rounds").fetchone() == (8,)
