"""The eval stage on a tiny random Llama with an OpenAI-compatible endpoint served on 127.0.0.1:
intervals, paired tests, latency/cost, TF-IDF shots, the report and `microtune report`, MLflow logging."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from microtune.cli import app
from microtune.evaluation.endpoint import match_label
from microtune.evaluation.report import SECTIONS
from microtune.evaluation.runner import similar_shots
from toydata import LABELS, TEXTS

SECRET = "sk-test-0123456789abcdef"
GOLD = {t: label for label in LABELS for t in TEXTS[label]}


class ChatServer:
    """A real HTTP server speaking the chat completions protocol, answering from a script:
    the gold label exactly, in another case/spacing, or a sentence that names no label (invalid)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.auth: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                server.auth.append(self.headers.get("Authorization", ""))
                if body["model"] != "big-generalist":
                    return self._send(404, {"error": {"message": f"model {body['model']} not found", "type": "invalid_request_error"}})
                self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": server.answer(body["messages"][-1]["content"])}}],
                                 "usage": {"prompt_tokens": 40, "completion_tokens": 2, "total_tokens": 42}})

            def _send(self, code: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @staticmethod
    def answer(text: str) -> str:
        gold = GOLD[text]
        if gold == "refund":
            return "I believe this is about money"  # names no label: invalid
        return gold if len(text) % 2 else f"  {gold.upper()} "


@pytest.fixture(scope="module")
def chat_server() -> Any:
    server = ChatServer()
    yield server
    server.httpd.shutdown()


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, chat_server: ChatServer) -> dict[str, Any]:
    import os

    import yaml

    from microtune import pipeline
    from toydata import toy_rows, write_jsonl

    root = tmp_path_factory.mktemp("eval")
    write_jsonl(root / "train.jsonl", toy_rows(5))
    write_jsonl(root / "test.jsonl", [{"text": TEXTS[l][i], "label": l} for l in LABELS for i in (5, 6, 7)])
    recipe = {"name": "toy", "task": {"type": "classify", "instruction": "Route the customer message.", "labels": LABELS},
              "data": {"train": "train.jsonl", "test": "test.jsonl", "split": {"valid": 0.0}}, "model": {"base": str(tiny_model_dir)},
              "train": {"epochs": 1, "batch_size": 4, "max_seq_len": 96},
              "eval": {"shots": 2, "batch_size": 4, "shot_selection": "similar", "n_resamples": 300, "latency_examples": 3,
                       "usd_per_hour": 0.5, "endpoints": [{"name": "big", "base_url": chat_server.url, "model": "big-generalist",
                                                           "api_key_env": "MT_TEST_KEY", "usd_per_1m_input_tokens": 1.0,
                                                           "usd_per_1m_output_tokens": 4.0}]}}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    os.environ["MT_TEST_KEY"] = SECRET
    try:
        adapter = pipeline.train(root / "recipe.yaml", workspace=root / "ws")
        folder = pipeline.evaluate(root / "recipe.yaml", workspace=root / "ws", adapter=adapter)
    finally:
        del os.environ["MT_TEST_KEY"]
    return {"root": root, "folder": folder, "adapter": adapter}


def test_match_label_exact_then_normalised_else_invalid() -> None:
    labels = ["card_declined", "Balance", "pin change"]
    assert match_label("card_declined", labels) == "card_declined"
    assert match_label("  BALANCE\n", labels) == "Balance"
    assert match_label("PIN   change", labels) == "pin change"
    assert match_label("the balance", labels) is None


@pytest.mark.slow
def test_similar_shots_pick_the_nearest_train_rows_most_similar_last() -> None:
    train = [{"text": t, "label": l} for l in LABELS for t in TEXTS[l][:5]]
    (shots,) = similar_shots(train, [{"text": "my parcel has not arrived, where is the package", "label": "shipping"}], 2)
    assert [s["text"] for s in shots] == ["where is my parcel", "the package has not arrived yet"]


@pytest.mark.slow
def test_metrics_carry_intervals_pvalues_latency_and_cost(evaluated: dict[str, Any]) -> None:
    metrics = json.loads((evaluated["folder"] / "metrics.json").read_text())
    assert list(metrics) == ["zero_shot", "few_shot", "big", "micro"]
    for system, m in metrics.items():
        for key in ("accuracy", "macro_f1", "valid_rate"):
            low, high = m["ci"][key]
            assert low <= m[key] <= high
        assert m["latency_ms_p50"] > 0 and m["latency_ms_p95"] >= m["latency_ms_p50"] and m["examples_per_s"] > 0
        assert (system == "micro") == ("p_value_vs_micro" not in m)
    assert metrics["micro"]["latency_n"] == 3 and metrics["big"]["latency_n"] == 9
    # 1000 / rate / 3600 h × $0.5/h, as stated in the recipe
    assert metrics["micro"]["usd_per_1k"] == pytest.approx(1000 / metrics["micro"]["examples_per_s"] / 3600 * 0.5)
    assert metrics["big"]["usd_per_1k"] == pytest.approx(1000 * (40 * 1.0 + 2 * 4.0) / 1e6)


@pytest.mark.slow
def test_endpoint_answers_mapped_and_invalid_counted(evaluated: dict[str, Any], chat_server: ChatServer) -> None:
    metrics = json.loads((evaluated["folder"] / "metrics.json").read_text())["big"]
    assert metrics["valid_rate"] == pytest.approx(6 / 9)  # the 3 refund rows got a sentence, not a label
    assert metrics["accuracy"] == pytest.approx(6 / 9)
    rows = [json.loads(line) for line in (evaluated["folder"] / "predictions.jsonl").read_text().splitlines()]
    assert {r["big"]["pred"] for r in rows if r["gold"] == "refund"} == {None}
    assert all(r["big"]["pred"] == r["gold"] for r in rows if r["gold"] != "refund")
    asked = chat_server.requests[-9:]
    assert all(q["temperature"] == 0 and "billing, shipping, refund" in q["messages"][0]["content"] for q in asked)
    assert set(chat_server.auth[-9:]) == {f"Bearer {SECRET}"}


@pytest.mark.slow
def test_api_key_is_never_written(evaluated: dict[str, Any]) -> None:
    ws = evaluated["root"] / "ws"
    leaks = [p for p in ws.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaks == []


@pytest.mark.slow
def test_stats_hold_mcnemar_and_paired_bootstrap(evaluated: dict[str, Any]) -> None:
    stats = json.loads((evaluated["folder"] / "stats.json").read_text())
    assert set(stats["comparisons"]) == {"zero_shot", "few_shot", "big"}
    rows = [json.loads(line) for line in (evaluated["folder"] / "predictions.jsonl").read_text().splitlines()]
    for system, comp in stats["comparisons"].items():
        only_micro = sum(r["micro"]["pred"] == r["gold"] != r[system]["pred"] for r in rows)
        assert comp["mcnemar"]["b"] == only_micro
        assert 0 < comp["metrics"]["accuracy"]["p_value"] <= 1
    shots = json.loads((evaluated["folder"] / "shots.json").read_text())
    assert shots["selection"] == "similar" and len(shots["shots"]) == 9 and all(len(s) == 2 for s in shots["shots"])


@pytest.mark.slow
def test_report_has_every_section_and_inline_images(evaluated: dict[str, Any]) -> None:
    page = (evaluated["folder"] / "report.html").read_text()
    for section in SECTIONS:
        assert f">{section}</h2>" in page
    assert page.count('src="data:image/png;base64,') == 5 and "http" not in page.split("<body>")[1].replace(
        evaluated["folder"].name, "")
    for name in ("intervals.png", "per_class_f1.png", "confusion_matrix.png", "calibration.png", "latency.png"):
        assert (evaluated["folder"] / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert TEXTS["refund"][5] in page or "got every test row right" in page  # worst errors show the input text


@pytest.mark.slow
def test_report_command_rerenders_from_the_artifact_alone(evaluated: dict[str, Any]) -> None:
    folder = evaluated["folder"]
    (folder / "report.html").unlink()
    (folder / "confusion_matrix.png").unlink()
    result = CliRunner().invoke(app, ["report", str(folder)])
    assert result.exit_code == 0, result.output
    assert (folder / "report.html").is_file() and (folder / "confusion_matrix.png").is_file()
    metrics = json.loads((folder / "metrics.json").read_text())
    low, high = metrics["micro"]["ci"]["accuracy"]
    # the table shows intervals (cells wrap at the runner's 80 columns, so look for each bound)
    assert f"[{low:.3f}," in result.output and f"{high:.3f}]" in result.output and "95% bootstrap intervals" in result.output
    assert "p vs micro" in result.output and "McNemar mid-p" in result.output
    bad = CliRunner().invoke(app, ["report", str(evaluated["adapter"])])
    assert bad.exit_code == 2 and "expected 'eval'" in bad.output


@pytest.mark.slow
def test_mlflow_run_has_intervals_pvalues_and_report(evaluated: dict[str, Any]) -> None:
    import mlflow

    manifest = json.loads((evaluated["adapter"] / "manifest.json").read_text())
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{evaluated['root'] / 'ws' / 'mlflow.db'}")
    data = client.get_run(manifest["mlflow_run_id"]).data.metrics
    assert data["eval.micro.accuracy.ci_low"] <= data["eval.micro.accuracy"] <= data["eval.micro.accuracy.ci_high"]
    assert 0 < data["eval.zero_shot.p_value_vs_micro"] <= 1 and "eval.big.usd_per_1k" in data
    assert "eval/report.html" in {a.path for a in client.list_artifacts(manifest["mlflow_run_id"], "eval")}


def test_unreachable_endpoint_and_missing_key_fail_with_the_fix(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    from microtune.config import EndpointConfig
    from microtune.core.errors import ModelError
    from microtune.evaluation.endpoint import EndpointSystem

    with pytest.raises(ModelError, match="MT_UNSET_KEY.*is not set"):
        EndpointSystem(EndpointConfig(name="x", base_url="http://127.0.0.1:9/v1", model="m", api_key_env="MT_UNSET_KEY"), LABELS)
    dead = EndpointSystem(EndpointConfig(name="x", base_url="http://127.0.0.1:9/v1", model="m", timeout_s=2), LABELS)
    with pytest.raises(ModelError, match="request to http://127.0.0.1:9/v1 failed") as info:
        dead.predict([[{"role": "user", "content": "hi"}]])
    assert "server is running" in (info.value.hint or "")


def test_endpoint_names_must_not_clash(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    from microtune.config import load_recipe
    from microtune.core.errors import RecipeError

    path = make_recipe(tiny_model_dir, eval={"endpoints": [{"name": "micro", "base_url": "http://x/v1", "model": "m"}]})
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert "endpoint names must be unique" in str(info.value) and "['micro']" in str(info.value)


@pytest.mark.slow
def test_missing_key_fails_before_tracking_and_keeps_the_run(evaluated: dict[str, Any]) -> None:
    import mlflow

    from microtune import pipeline
    from microtune.core.errors import ModelError

    root = evaluated["root"]
    with pytest.raises(ModelError, match="eval.endpoints\\[0\\].api_key_env: environment variable 'MT_TEST_KEY' is not set"):
        pipeline.evaluate(root / "recipe.yaml", workspace=root / "ws", adapter=evaluated["adapter"])
    manifest = json.loads((evaluated["adapter"] / "manifest.json").read_text())
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'ws' / 'mlflow.db'}")
    assert client.get_run(manifest["mlflow_run_id"]).info.status == "FINISHED"
