"""Registry: champion/challenger aliases on a real MLflow SQLite store, rollback, the gate's rules, the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from microtune.cli import app
from microtune.config import GateConfig
from microtune.registry.gate import Evidence, decide
from microtune.registry.models import (
    CHALLENGER,
    CHAMPION,
    RegistryError,
    by_alias,
    list_versions,
    promote,
    registry_client,
    rollback,
    set_challenger,
)


@pytest.fixture
def store(tmp_path: Path):
    """A SQLite MLflow store with model `m` and three versions whose sources are real folders."""
    ws = tmp_path / "ws"
    ws.mkdir()
    client = registry_client(f"sqlite:///{ws / 'mlflow.db'}")
    client.create_registered_model("m")
    for i in range(3):
        folder = tmp_path / f"adapter{i}"
        folder.mkdir()
        client.create_model_version("m", str(folder), tags={"metric.micro.accuracy": str(0.5 + i / 10)})
    return client, ws


@pytest.mark.slow
def test_promote_moves_aliases_and_rollback_returns(store) -> None:
    client, _ = store
    promote(client, "m", "1", "first")
    set_challenger(client, "m", "2")
    promote(client, "m", "2", "better")
    v2 = by_alias(client, "m", CHAMPION)
    assert v2.version == "2" and CHALLENGER not in v2.aliases  # never both
    assert by_alias(client, "m", CHALLENGER) is None and v2.tags["previous_champion"] == "1"
    with pytest.raises(RegistryError, match="is the champion; it cannot also be the challenger"):
        set_challenger(client, "m", "2")
    assert rollback(client, "m").version == "1"
    assert [v.version for v in list_versions(client, "m") if CHAMPION in v.aliases] == ["1"]
    with pytest.raises(RegistryError, match="replaced no earlier champion"):
        rollback(client, "m")


@pytest.mark.slow
def test_a_champion_must_be_loadable_and_names_are_checked(store, tmp_path: Path) -> None:
    client, _ = store
    (tmp_path / "adapter2").rmdir()
    with pytest.raises(RegistryError, match="points at missing files"):
        promote(client, "m", "3", "x")
    assert by_alias(client, "m", CHAMPION) is None
    with pytest.raises(RegistryError) as err:
        list_versions(client, "nope")
    assert "registered: m" in err.value.hint
    with pytest.raises(RegistryError, match="has no version '9'"):
        promote(client, "m", "9", "x")


def _evidence(champ: float, chall: float, p: float, **extra) -> Evidence:
    return Evidence("accuracy", {"accuracy": champ, "valid_rate": 1.0, **extra.get("c", {})},
                    {"accuracy": chall, "valid_rate": 1.0, **extra.get("n", {})}, p, "McNemar", 200, extra.get("recall", {}),
                    extra.get("flips", {}))


_DROP = {"champion": {"a": 0.9, "b": 1.0}, "challenger": {"a": 1.0, "b": 0.7}}


@pytest.mark.parametrize("evidence, verdict, reason", [
    (_evidence(0.80, 0.86, 0.01), "promote", "accuracy 0.8000 → 0.8600"),
    (_evidence(0.80, 0.79, 0.01), "reject", "gain -0.0100 is below min_gain"),
    (_evidence(0.80, 0.80, 0.01), "reject", "gain +0.0000 is not above 0: the challenger does not beat the champion (min_gain 0.0)"),
    (_evidence(0.80, 0.82, 0.30), "reject", "not significant: McNemar p=0.3"),
    (_evidence(0.80, 0.86, 0.01, recall={"champion": {"a": 0.9, "b": 0.8}, "challenger": {"a": 1.0, "b": 0.5}}),
     "reject", "recall of 'b' falls by 0.300"),
    # 10 rows of b: 3 lost, 0 gained is within noise (one-sided binomial p=0.125); 6 lost of 6 flips is not (p=0.016)
    (_evidence(0.80, 0.86, 0.01, recall=_DROP, flips={"a": (0, 1), "b": (3, 0)}), "promote", "accuracy 0.8000 → 0.8600"),
    (_evidence(0.80, 0.86, 0.01, recall={"champion": {"b": 1.0}, "challenger": {"b": 0.4}}, flips={"b": (6, 0)}),
     "reject", "6 of its rows lost, 0 gained, one-sided p=0.0156"),
    (_evidence(0.80, 0.86, 0.01, n={"valid_rate": 0.9}), "reject", "valid answers fall by 0.100"),
    (_evidence(0.80, 0.86, 0.01, c={"latency_ms_p50": 10.0}, n={"latency_ms_p50": 20.0}), "reject", "p50 latency 20.0 ms"),
])
def test_gate_rules(evidence: Evidence, verdict: str, reason: str) -> None:
    d = decide("m", "1", "2", evidence, GateConfig())
    assert d.verdict == verdict and reason in d.reason, d.reason
    assert d.details["gain"] == pytest.approx(evidence.challenger["accuracy"] - evidence.champion["accuracy"])


def test_recall_drops_within_noise_are_reported() -> None:
    d = decide("m", "1", "2", _evidence(0.80, 0.86, 0.01, recall=_DROP, flips={"b": (3, 0)}), GateConfig())
    assert d.details["recall_drops_within_noise"] == [{"label": "b", "drop": pytest.approx(0.3), "lost": 3, "gained": 0,
                                                       "p_value": pytest.approx(0.125)}]


def test_min_gain_is_respected() -> None:
    d = decide("m", "1", "2", _evidence(0.80, 0.81, 0.001), GateConfig(min_gain=0.02))
    assert d.verdict == "reject" and "below min_gain 0.02" in d.reason
    assert decide("m", None, "1", None, GateConfig()).verdict == "promote"


@pytest.mark.slow
def test_models_cli(store) -> None:
    client, ws = store
    runner = CliRunner()
    assert runner.invoke(app, ["models", "promote", "m", "2", "-w", str(ws), "--reason", "hotfix"]).exit_code == 0
    listed = runner.invoke(app, ["models", "list", "m", "-w", str(ws)])
    assert listed.exit_code == 0 and "champion" in listed.output and "0.7000" in listed.output
    shown = runner.invoke(app, ["models", "show", "m", "-w", str(ws)])
    assert "version 2" in shown.output and "promoted_reason: manual: hotfix" in shown.output
    bad = runner.invoke(app, ["models", "rollback", "m", "-w", str(ws)])
    assert bad.exit_code == 2 and "replaced no earlier champion" in bad.output
    unknown = runner.invoke(app, ["models", "show", "zzz", "-w", str(ws)])
    assert unknown.exit_code == 2 and "no registered model named 'zzz'" in unknown.output


@pytest.mark.slow
def test_run_twice_gates_the_second_version(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    """First run: champion. Second run (same data, same seed → same predictions): no gain → rejected, champion kept."""
    from microtune import pipeline

    recipe = make_recipe(tiny_model_dir, train={"max_steps": 2})
    first = pipeline.run(recipe, workspace=tmp_path / "ws")
    assert first.decision.verdict == "promote" and "first version" in first.decision.reason
    second = pipeline.run(recipe, workspace=tmp_path / "ws")
    assert second.decision.verdict == "reject" and "gain +0.0000 is not above 0" in second.decision.reason
    assert second.decision.details["test"] == "McNemar" and second.decision.details["p_value"] == 1.0
    client = registry_client(f"sqlite:///{tmp_path / 'ws' / 'mlflow.db'}")
    versions = {v.version: v for v in list_versions(client, "toy")}
    assert versions["1"].aliases == [CHAMPION] and versions["2"].aliases == []  # no stale challenger
    assert versions["2"].tags["gate.verdict"] == "reject"
    saved = json.loads((tmp_path / "ws" / "toy" / "decisions" / "v2.json").read_text())
    assert saved["verdict"] == "reject" and saved["champion"] == "1"


@pytest.mark.slow
def test_against_a_real_mlflow_server(tmp_path: Path) -> None:
    """The same alias moves through `mlflow server` on 127.0.0.1, and the CLI finds it via MLFLOW_TRACKING_URI."""
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                               "--default-artifact-root", (tmp_path / "art").as_uri(), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        client = registry_client(uri)
        client.create_registered_model("remote")
        experiment = client.create_experiment("remote")
        for i in range(2):  # a server accepts sources inside a run's artifacts, as `microtune run` registers them
            (tmp_path / f"a{i}").mkdir()
            (tmp_path / f"a{i}" / "adapter_config.json").write_text("{}")
            run = client.create_run(experiment)
            client.log_artifacts(run.info.run_id, str(tmp_path / f"a{i}"), "adapter")
            client.create_model_version("remote", f"{run.info.artifact_uri}/adapter", run_id=run.info.run_id)
        promote(client, "remote", "1", "first")
        promote(client, "remote", "2", "better")
        assert by_alias(client, "remote", CHAMPION).version == "2"
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
        listed = subprocess.run([sys.executable, "-m", "microtune.cli", "models", "rollback", "remote"], env=env,
                                capture_output=True, text=True, timeout=120)
        assert listed.returncode == 0 and "champion is version 1 again" in listed.stdout
        assert by_alias(client, "remote", CHAMPION).version == "1"
    finally:
        server.terminate()
        server.wait(timeout=30)
