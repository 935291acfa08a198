"""`microtune synth` against a real HTTP teacher on 127.0.0.1: retries, failures, cache and kill -9 resume,
every reject reason end to end, the judge, the API key, and the errors a user can hit."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

import pytest
from typer.testing import CliRunner

from fake_teacher import GEN, FakeTeacher, examples, good_answer, label_of, synth_recipe_factory
from microtune import tasks
from microtune.cli import app
from microtune.core.errors import RecipeError, TeacherError
from microtune.pipeline import synth
from microtune.tasks import GenerateConfig, GenerateTask
from microtune.tasks.base import type_field
from toydata import LABELS

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture
def synth_recipe(make_recipe, tiny_model_dir: Path, tmp_path: Path):
    return synth_recipe_factory(make_recipe, tiny_model_dir, tmp_path)


def rows(folder: Path, name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / name).read_text().splitlines()]


def manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "manifest.json").read_text())


@pytest.mark.slow
def test_good_teacher_gives_accepted_rows_with_provenance_and_reports(synth_recipe, tmp_path: Path) -> None:
    with FakeTeacher() as teacher:
        folder = synth(synth_recipe(teacher.url, attributes={"channel": ["chat", "email"]}), workspace=tmp_path / "ws")
    m, accepted = manifest(folder), rows(folder, "accepted.jsonl")
    assert m["kind"] == "synthetic" and m["plan"]["requests"] == 9 and len(teacher.hits) == 9
    assert m["accepted_per_stratum"] == {label: 4 for label in LABELS}
    row = accepted[0]
    assert row["text"] in GEN[row["label"]] and row["source"].startswith("synthetic:")
    prov = row["provenance"]
    assert len(prov["exemplar_ids"]) == 2 and prov["attributes"]["channel"] in ("chat", "email") and prov["teacher"] == "fake-teacher"
    assert len(prov["prompt_hash"]) == 64 and {"copy_rouge_l", "probe_prob", "p_synthetic"} <= set(row["scores"])
    assert m["usage"]["prompt_tokens"] == 900 and m["usage"]["completion_tokens"] == 180 and m["usage"]["sent"] == 9
    held = set(m["holdout"])
    shown = {s for hit in teacher.hits for s in held if real_texts(folder)[s] in hit["body"]["messages"][-1]["content"]}
    assert len(held) == 6 and not shown  # held-out real rows never reach the teacher
    assert (folder / "fidelity.html").read_text().count("<table>") >= 4 and json.loads((folder / "fidelity.json").read_text())["probes"]
    from mlflow.tracking import MlflowClient

    run = MlflowClient(f"sqlite:///{tmp_path / 'ws' / 'mlflow.db'}").get_run(m["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics["synth.accepted"] == 12
    assert run.data.params["synth.teacher.model"] == "fake-teacher"


def real_texts(folder: Path) -> dict[str, str]:
    dataset = Path(manifest(folder)["dataset_dir"])
    return {r["source"]: r["text"] for r in rows(dataset, "train.jsonl")}


@pytest.mark.slow
def test_429_with_retry_after_and_500s_are_retried(synth_recipe, tmp_path: Path) -> None:
    def flaky(body: dict[str, Any], attempt: int):
        if attempt == 0:
            return 429, {"Retry-After": "1"}, "slow down"
        if attempt == 1:
            return 500, {}, "boom"
        return good_answer(body, attempt)

    with FakeTeacher(flaky) as teacher:
        folder = synth(synth_recipe(teacher.url, per_label=2, oversample=1.0), workspace=tmp_path / "ws")
    m = manifest(folder)
    assert m["usage"] == {**m["usage"], "requests": 3, "sent": 3, "failed": 0, "retries": 6}
    assert len(teacher.hits) == 9 and all(r["provenance"]["retries"] == 2 for r in rows(folder, "accepted.jsonl"))
    first = {json.dumps(h["body"]["messages"]): h["time"] for h in teacher.hits if h["attempt"] == 0}
    second = {json.dumps(h["body"]["messages"]): h["time"] for h in teacher.hits if h["attempt"] == 1}
    assert all(second[k] - first[k] >= 0.95 for k in first)  # Retry-After: 1 was honoured, not the 0.5 s default


@pytest.mark.slow
def test_a_request_that_keeps_failing_is_a_recorded_reject_and_is_asked_again_next_run(synth_recipe, tmp_path: Path) -> None:
    def refund_down(body: dict[str, Any], attempt: int):
        return (503, {}, "overloaded") if label_of(body) == "refund" else good_answer(body, attempt)

    with FakeTeacher(refund_down) as teacher:
        folder = synth(synth_recipe(teacher.url, teacher={"max_attempts": 2}), workspace=tmp_path / "ws")
    failed = [r for r in rows(folder, "rejected.jsonl") if r["reason"] == "teacher_error"]
    assert len(failed) == 3 and {r["label"] for r in failed} == {"refund"} and failed[0]["text"] is None
    assert failed[0]["detail"].startswith("HTTP 503 after 2 attempt(s)")
    m = manifest(folder)
    assert m["usage"]["failed"] == 3 and m["filters"]["teacher_error"]["per_label"] == {"refund": 3}
    assert "refund" not in m["accepted_per_stratum"] and all(r["text"].strip() for r in rows(folder, "accepted.jsonl"))
    with FakeTeacher() as healed:
        again = synth(synth_recipe(healed.url, teacher={"max_attempts": 2}), workspace=tmp_path / "ws")
    assert len(healed.hits) == 3 and {label_of(h["body"]) for h in healed.hits} == {"refund"}  # only the failed ones
    assert manifest(again)["usage"]["from_cache"] == 6 and manifest(again)["accepted_per_stratum"]["refund"] == 4


@pytest.mark.slow
def test_a_rerun_answers_from_the_cache(synth_recipe, tmp_path: Path) -> None:
    with FakeTeacher() as teacher:
        recipe = synth_recipe(teacher.url)
        first = synth(recipe, workspace=tmp_path / "ws")
        hits = len(teacher.hits)
        second = synth(recipe, workspace=tmp_path / "ws")
    assert hits == 9 and len(teacher.hits) == 9
    assert manifest(second)["usage"]["from_cache"] == 9 and manifest(second)["usage"]["sent"] == 0
    assert manifest(second)["usage"]["cached_prompt_tokens"] == 900
    assert [r["text"] for r in rows(first, "accepted.jsonl")] == [r["text"] for r in rows(second, "accepted.jsonl")]


@pytest.mark.slow
def test_after_kill_9_a_rerun_sends_only_the_unanswered_requests(synth_recipe, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    with FakeTeacher(hold_from=5) as teacher:  # 4 answers, then the 5th request waits: the run is killed there, whatever the speed
        recipe = synth_recipe(teacher.url, per_label=10, oversample=1.0, teacher={"concurrency": 1})
        env = {**os.environ, "PYTHONPATH": str(SRC)}
        proc = subprocess.Popen([sys.executable, "-m", "microtune.cli", "synth", str(recipe), "-w", str(ws)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120  # a safety net against a hang, not part of what is tested
        while len(teacher.hits) < 5 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert len(teacher.hits) == 5, "the synth process never reached the held request"
        with sqlite3.connect(ws / "synth-cache.sqlite") as db:
            cached = db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]
        assert cached == 4 and not list((ws / "toy" / "synthetic").glob("2*"))  # every answer kept, nothing half-written
        teacher.release()
        folder = synth(recipe, workspace=ws)
    m = manifest(folder)
    assert len(teacher.hits) - 5 == 11
    assert m["usage"]["from_cache"] == 4 and m["usage"]["sent"] == 11


def scripted(body: dict[str, Any], attempt: int):
    """Per request index (from the seed): one failure mode each, so every reject reason shows up."""
    i, label = body["seed"] - 13 * 100_000, label_of(body)
    long = " ".join(["the parcel is late again"] * 12)
    answers = {
        0: '{"examples": [{"text": "my bill is wro',                                                     # malformed JSON
        1: examples(label, ["I'm sorry, but I cannot help with writing that", "email me at jo@example.com about the fee"]),
        2: examples(label, ["my card was charged twice", "why did you charge me two times this month"]),  # copy + good
        3: examples(label, ["where is the box i ordered last week", "Where is the box I ordered last week?"]),
        4: json.dumps({"examples": [{"text": "i want a refund for this", "label": "refund"}, {"label": "shipping"}]}),
        5: examples(label, ["my card was billed twice and the invoice fee is wrong", long]),                # probe + length
    }
    return 200, {}, answers.get(i) or examples(label, GEN[label][(i * 2) % 12: (i * 2) % 12 + 2])


@pytest.mark.slow
def test_every_reject_reason_is_recorded_and_counted_per_label(synth_recipe, tmp_path: Path) -> None:
    with FakeTeacher(scripted) as teacher:
        folder = synth(synth_recipe(teacher.url, filters={"probe_top_k": 1}), workspace=tmp_path / "ws")
    got = {(r["reason"], r["label"]) for r in rows(folder, "rejected.jsonl")}
    assert got >= {("schema", "billing"), ("refusal", "billing"), ("pii", "billing"), ("copy", "billing"),
                   ("near_duplicate", "shipping"), ("label", "shipping"), ("schema", "shipping"), ("probe", "shipping"),
                   ("length", "shipping")}
    table = manifest(folder)["filters"]
    assert table["schema"]["per_label"] == {"billing": 1, "shipping": 1} and table["pii"]["rejected"] == 1
    assert table["copy"]["per_label"] == {"billing": 1} and 0 < table["probe"]["pass_rate"] < 1
    label_reject = next(r for r in rows(folder, "rejected.jsonl") if r["reason"] == "label")
    assert label_reject["detail"] == "asked for 'shipping', got 'refund'"


@pytest.mark.slow
def test_the_judge_rejects_what_it_says_no_to(synth_recipe, tmp_path: Path) -> None:
    def with_judge(body: dict[str, Any], attempt: int):
        if body["messages"][0]["content"].startswith("You check labels"):
            return 200, {}, "No." if "refund policy" in body["messages"][-1]["content"] else "Yes"
        return good_answer(body, attempt)

    with FakeTeacher(with_judge) as teacher:
        folder = synth(synth_recipe(teacher.url, per_label=12, examples_per_request=4, oversample=1.0,
                                              filters={"judge": True, "judge_model": "judge-x"}), workspace=tmp_path / "ws")
    judged = [r for r in rows(folder, "rejected.jsonl") if r["reason"] == "judge"]
    assert [r["text"] for r in judged] == ["what is your refund policy"] and "judge-x" in judged[0]["detail"]
    assert {h["body"]["model"] for h in teacher.hits} == {"fake-teacher", "judge-x"}
    assert all(r["scores"]["judge"] == "yes" for r in rows(folder, "accepted.jsonl"))


@pytest.mark.slow
def test_drop_most_synthetic_rejects_the_rows_the_classifier_flags(synth_recipe, tmp_path: Path) -> None:
    with FakeTeacher() as teacher:
        folder = synth(synth_recipe(teacher.url, fidelity={"drop_most_synthetic": 0.25}), workspace=tmp_path / "ws")
    dropped = [r for r in rows(folder, "rejected.jsonl") if r["reason"] == "most_synthetic"]
    kept = rows(folder, "accepted.jsonl")
    assert len(dropped) == 3 and len(kept) == 9
    assert min(r["scores"]["p_synthetic"] for r in dropped) >= max(r["scores"]["p_synthetic"] for r in kept)
    assert json.loads((folder / "fidelity.json").read_text())["before_drop"]["synthetic_rows"] == 12


@pytest.mark.slow
def test_the_api_key_is_sent_but_never_written(synth_recipe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "sk-test-" + "7f3a9c" * 6
    monkeypatch.setenv("MT_TEACHER_KEY", secret)
    ws = tmp_path / "ws"
    with FakeTeacher() as teacher:
        result = CliRunner().invoke(app, ["synth", str(synth_recipe(teacher.url, teacher={"api_key_env": "MT_TEACHER_KEY"})),
                                          "-w", str(ws)])
    assert result.exit_code == 0, result.output
    assert {h["headers"]["authorization"] for h in teacher.hits} == {f"Bearer {secret}"}
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {"synth-cache.sqlite", "mlflow.db", "accepted.jsonl", "fidelity.html"} <= {p.name for p in written}
    assert [p for p in written if secret.encode() in p.read_bytes()] == []
    assert secret not in result.output
    synth_manifest = next(p for p in ws.rglob("manifest.json") if "synthetic" in p.parts)
    assert json.loads(synth_manifest.read_text())["teacher"]["api_key_env"] == "MT_TEACHER_KEY"


@pytest.mark.slow
def test_user_errors_exit_2_with_the_fix(synth_recipe, tmp_path: Path) -> None:
    runner, ws = CliRunner(), tmp_path / "ws"
    no_key = runner.invoke(app, ["synth", str(synth_recipe("http://127.0.0.1:9/v1", teacher={"api_key_env": "MT_UNSET_KEY_X"})),
                                 "-w", str(ws)])
    assert no_key.exit_code == 2 and "$MT_UNSET_KEY_X" in no_key.output and "export MT_UNSET_KEY_X" in no_key.output
    with FakeTeacher(lambda body, attempt: (500, {}, "down")) as teacher:
        down = runner.invoke(app, ["synth", str(synth_recipe(teacher.url, teacher={"max_attempts": 1})), "-w", str(ws)])
    assert down.exit_code == 2 and "every one of 9 request(s)" in down.output and "HTTP 500" in down.output
    assert not (ws / "toy" / "synthetic").exists() or not list((ws / "toy" / "synthetic").iterdir())
    with pytest.raises(TeacherError):
        synth(synth_recipe("ftp://example/v1"), workspace=ws)


def test_a_recipe_without_a_synth_section_says_how_to_add_one(make_recipe, tiny_model_dir: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["synth", str(make_recipe(tiny_model_dir)), "-w", str(tmp_path / "ws")])
    assert result.exit_code == 2 and "has no `synth` section" in result.output and "per_label" in result.output


class NoSynthConfig(GenerateConfig):
    type: Literal["nosynth"] = type_field("nosynth")  # type: ignore[assignment]


class NoSynthTask(GenerateTask):
    """A plugin task type without synth hooks."""

    name, config = "nosynth", NoSynthConfig

    def synth(self) -> None:
        return None


@pytest.fixture
def nosynth_type():
    tasks.register(NoSynthTask)
    yield "nosynth"
    tasks.unregister("nosynth")


def test_synth_on_a_task_type_without_synth_hooks_exits_2_with_the_fix(make_recipe, tiny_model_dir: Path, tmp_path: Path,
                                                                       nosynth_type: str) -> None:
    """Refused when the recipe loads (the chat task type moved the rule into the recipe: every command, `check` first,
    refuses a `synth` section a task type cannot fill), so before the local teacher, the data check or any request."""
    recipe = make_recipe(tiny_model_dir, task={"type": nosynth_type, "labels": None}, synth={"total": 4})  # teacher: the local default
    ws = tmp_path / "ws"
    result = CliRunner().invoke(app, ["synth", str(recipe), "-w", str(ws)])
    assert result.exit_code == 2, result.output
    assert f"`microtune synth` does not support task.type {nosynth_type}: its task class has no synth hooks" in result.output
    assert "remove the `synth` section" in result.output
    assert not ws.exists() or not list(ws.rglob("manifest.json"))  # nothing checked, nothing written
    with pytest.raises(RecipeError, match=f"does not support task.type {nosynth_type}"):
        synth(recipe, workspace=ws)


@pytest.mark.slow
def test_the_cli_shows_the_cascade_and_warns_about_labels_short_of_their_quota(synth_recipe, tmp_path: Path) -> None:
    def refund_refused(body: dict[str, Any], attempt: int):
        if label_of(body) == "refund":
            return 200, {}, examples("refund", ["I'm sorry, but I cannot help with that request"])
        return good_answer(body, attempt)

    with FakeTeacher(refund_refused) as teacher:
        result = CliRunner().invoke(app, ["synth", str(synth_recipe(teacher.url)), "-w", str(tmp_path / "ws")])
    assert result.exit_code == 0, result.output
    assert "near_duplicate" in result.output and "fidelity" in result.output
    assert "1 of the labels below quota" in result.output and "'refund': '0/4'" in result.output


def test_an_endpoint_that_is_not_an_openai_api_is_named_as_such(synth_recipe, tmp_path: Path) -> None:
    with FakeTeacher(lambda body, attempt: (200, {}, b"<html>router login</html>")) as teacher:
        with pytest.raises(TeacherError, match=r"every one of 9 request\(s\).*not a chat completion \(got '<html>router login"):
            synth(synth_recipe(teacher.url), workspace=tmp_path / "ws")


@pytest.mark.slow
def test_local_teacher_is_microtune_serve_on_the_base_model(synth_recipe, tmp_path: Path, tiny_model_dir: Path) -> None:
    """`base_url: local` serves the recipe's base model on 127.0.0.1 for the run; its answers go through the same filters."""
    folder = synth(synth_recipe("local", teacher={"max_tokens": 24}), workspace=tmp_path / "ws")
    m = manifest(folder)
    assert m["teacher"]["base_url"].startswith("http://127.0.0.1:") and m["teacher"]["model"] == str(tiny_model_dir)
    assert m["usage"]["sent"] == m["plan"]["requests"] > 0  # every request reached the local server
    assert m["accepted"] + m["rejected"] > 0


@pytest.mark.slow
def test_tuned_local_teacher_learns_the_request_format_from_real_rows_only(synth_recipe, tmp_path: Path) -> None:
    """`tune_steps`: the base is fine-tuned on requests answered by real rows (never the fidelity holdout), merged and served."""
    recipe = synth_recipe("local", teacher={"max_tokens": 24, "tune_steps": 2}, fidelity={"folds": 2, "max_auc": 1.0, "holdout": 0.2})
    ws = tmp_path / "ws"
    folder = synth(recipe, workspace=ws)
    m = manifest(folder)
    teachers = list((ws / "toy" / "teacher").iterdir())
    assert len(teachers) == 1 and m["teacher"]["model"] == str(teachers[0] / "merged")
    rows = [json.loads(line) for line in (teachers[0] / "train.jsonl").read_text().splitlines()]
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    real = {json.loads(line)["text"]: json.loads(line)["label"] for line in lines}
    holdout = {json.loads(lines[int(src.rsplit(":", 1)[1]) - 1])["text"] for src in m["holdout"]}
    answers = [json.loads(r["target"])["examples"][0] for r in rows]
    assert holdout and all(real[a["text"]] == a["label"] and f'label "{a["label"]}"' in r["text"] for a, r in zip(answers, rows))
    assert len(rows) == len(real) - len(holdout) and not holdout & {a["text"] for a in answers}  # the holdout stays unseen
    assert m["plan"]["requests"] == m["usage"]["sent"] == m["plan"]["examples_asked"]  # one example per request
    # a second run reuses the merged teacher: nothing is trained again
    stamp = (teachers[0] / "merged" / "manifest.json").stat().st_mtime_ns
    synth(recipe, workspace=ws)
    assert (teachers[0] / "merged" / "manifest.json").stat().st_mtime_ns == stamp and len(list((ws / "toy" / "teacher").iterdir())) == 1
