"""`microtune run` end to end on the bundled SmolLM2: artifacts, MLflow run + model version, plain-PEFT reload."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, bundled_dir: Path) -> dict:
    from toydata import LABELS, TEXTS, write_jsonl  # noqa: F401  (TEXTS documents where rows come from)

    root = tmp_path_factory.mktemp("e2e")
    write_jsonl(root / "train.jsonl", [{"text": t, "label": l} for l in LABELS for t in TEXTS[l][:6]])
    write_jsonl(root / "test.jsonl", [{"text": t, "label": l} for l in LABELS for t in TEXTS[l][6:]])
    (root / "recipe.yaml").write_text(
        "name: support-router\n"
        "task: {type: classify, instruction: Route the customer message to a team.}\n"
        "data: {train: train.jsonl, test: test.jsonl, split: {valid: 0.0}}\n"
        "train: {epochs: 2, batch_size: 6, lr: 1.0e-3, max_seq_len: 96, log_every: 1}\n"
        "eval: {shots: 3, batch_size: 8}\n"
    )
    ws = root / "ws"
    proc = subprocess.run([sys.executable, "-m", "microtune.cli", "run", str(root / "recipe.yaml"), "-w", str(ws)],
                          capture_output=True, text=True, timeout=900, cwd=root)
    return {"root": root, "ws": ws, "proc": proc}


def test_run_succeeds_and_prints_the_comparison(finished_run: dict) -> None:
    proc = finished_run["proc"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    for system in ("zero_shot", "few_shot", "micro"):
        assert system in proc.stdout
    assert "registered support-router version 1" in proc.stdout


def test_artifacts_and_metrics(finished_run: dict) -> None:
    ws = finished_run["ws"]
    (adapter,) = (ws / "support-router" / "adapters").iterdir()
    (evaluation,) = (ws / "support-router" / "evals").iterdir()
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert set(metrics) == {"zero_shot", "few_shot", "micro"}
    for values in metrics.values():
        assert values["valid_rate"] == 1.0  # constrained decoding: every answer is a label
        assert 0.0 <= values["accuracy"] <= 1.0 and values["examples"] == 6
    rows = [json.loads(line) for line in (evaluation / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(0 < r["micro"]["prob"] <= 1 for r in rows)
    manifest = json.loads((adapter / "manifest.json").read_text())
    assert manifest["lineage"]["base_model"] == "smollm2-135m-instruct"
    assert manifest["lineage"]["base_model_source"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_mlflow_run_and_registered_version(finished_run: dict) -> None:
    import mlflow

    ws = finished_run["ws"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlflow.db'}")
    (version,) = client.search_model_versions("name='support-router'")
    assert version.tags["dataset_hash"] and version.tags["base_model_hash"]
    assert float(version.tags["metric.micro.accuracy"]) >= 0
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED"
    assert "eval.micro.accuracy" in run.data.metrics and "cost.wall_time_s" in run.data.metrics
    assert len(client.get_metric_history(run.info.run_id, "loss")) >= 2
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in artifacts


def test_plain_peft_reload_reproduces_micro_predictions(finished_run: dict, bundled_dir: Path) -> None:
    """The adapter folder is a normal PEFT adapter: load it with PeftModel and get the same answers."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from microtune.models import LabelPredictor
    from microtune.tasks import ClassifyConfig, get_task
    from microtune.tasks.render import Renderer

    ws = finished_run["ws"]
    (adapter,) = (ws / "support-router" / "adapters").iterdir()
    (evaluation,) = (ws / "support-router" / "evals").iterdir()
    labels = json.loads((adapter / "manifest.json").read_text())["labels"]
    bf16 = json.loads((adapter / "manifest.json").read_text())["cost"]["bf16"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(bundled_dir), str(adapter))
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    renderer = Renderer(tokenizer)
    task = get_task(ClassifyConfig(instruction="Route the customer message to a team."), labels)
    rows = [json.loads(line) for line in (evaluation / "predictions.jsonl").read_text().splitlines()]
    preds = LabelPredictor(model, renderer, labels, bf16=bf16).predict(
        [renderer.prompt_ids(task.messages({"text": r["text"], "label": ""})) for r in rows])
    assert [p for p, _ in preds] == [r["micro"]["pred"] for r in rows]
