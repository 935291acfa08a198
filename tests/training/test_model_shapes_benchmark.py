"""benchmarks/model_shapes.py's pieces, without its big models: the SmolLM2 shapes' configs and parameter counts (analytic,
checked against a model built on the meta device: no weights allocated), the 135M shape against the bundled model's own
config, the memory estimate that decides which cells may run, rows of an exact token length, and one cell trained on the
tiny random Llama through the same set-up and steps the benchmark times."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from benchmark_helpers import load_benchmark


@pytest.fixture(scope="module")
def shapes() -> Any:
    return load_benchmark("model_shapes")


@pytest.mark.parametrize("shape", ["135M", "360M", "1.7B"])
def test_each_shape_has_its_nominal_parameter_count(shapes: Any, shape: str) -> None:
    import torch
    from transformers import LlamaForCausalLM

    config = shapes.llama_config(shape)
    counted = shapes.param_count(config)["total"]
    assert abs(counted / shapes.NOMINAL[shape] - 1) < 0.03, (shape, counted)
    with torch.device("meta"):  # shapes only: a 1.7B model costs no memory here
        model = LlamaForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == counted


def test_the_135m_shape_is_the_bundled_models(shapes: Any, bundled_dir: Path) -> None:
    import json

    bundled = json.loads((bundled_dir / "config.json").read_text())
    ours = shapes.llama_config("135M").to_dict()
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size",
                "tie_word_embeddings", "max_position_embeddings"):
        assert ours[key] == bundled[key], key
    assert ours["rope_parameters"]["rope_theta"] == bundled["rope_parameters"]["rope_theta"]


def test_fewer_layers_and_lora_counts(shapes: Any) -> None:
    full, two = shapes.llama_config("1.7B"), shapes.llama_config("1.7B", layers=2)
    assert two.num_hidden_layers == 2 and two.hidden_size == full.hidden_size
    per_layer = (shapes.param_count(full)["linear"] - shapes.param_count(two)["linear"]) / 22
    assert per_layer == 4 * 2048 * 2048 + 3 * 2048 * 8192
    assert shapes.lora_params(shapes.llama_config("135M")) == 4_884_480  # what PEFT reports for r 16 on all-linear (measured)


def test_full_finetuning_of_the_1_7b_shape_is_estimated_not_to_fit_24_gib(shapes: Any) -> None:
    big = shapes.llama_config("1.7B")
    full, lora, qlora = (shapes.estimate_gib(big, m, 128, 1) for m in ("full", "lora", "qlora"))
    assert full > 24 > lora > qlora
    assert shapes.estimate_gib(big, "lora-bf16", 128, 1) < lora
    assert shapes.estimate_gib(big, "lora", 512, 1) > lora  # longer rows keep more activations


def test_linear_fit_extrapolates_a_line(shapes: Any) -> None:
    a, b = shapes.linear_fit([2, 4, 6], [1100.0, 1500.0, 1900.0])
    assert a == pytest.approx(700) and b == pytest.approx(200)


def test_rows_are_exactly_the_asked_length(shapes: Any, tokenizer: Any, tmp_path: Path, tiny_model_dir: Path) -> None:
    from microtune.config import Recipe
    from microtune.tasks import get_task
    from microtune.tasks.render import Renderer, encode_example

    args = argparse.Namespace(method="lora", steps=1, batch=2, seq_len=64)
    recipe = Recipe.model_validate(shapes.recipe_dict(args, tiny_model_dir))
    rows = shapes.exact_rows(recipe, tokenizer, 64, 4)
    task, renderer = get_task(recipe.task, ["yes", "no"]), Renderer(tokenizer)
    lengths = [sum(len(x) for x in encode_example(task, r, renderer, 1000)[:2]) for r in rows]
    assert lengths == [64] * 4
    assert len({r["text"] for r in rows}) == 4  # no two rows alike: the batch shares no prefix beyond template and instruction


def test_one_cell_trains_through_the_engine(shapes: Any, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = argparse.Namespace(method="lora", steps=2, batch=2, seq_len=48, checkpoint=str(tiny_model_dir))
    out = shapes.train_cell(args)
    assert out["step_tokens"] == [96, 96, 96]  # every row exactly seq_len tokens, batch 2
    assert len(out["step_s"]) == 3 and out["tokens_per_s"] > 0
    assert 0 < out["trainable_params"] < out["total_params"] and out["weights_dtype"] == "float32"


def test_the_report_says_met_or_not_with_the_number(shapes: Any) -> None:
    def cell(method: str, peak: float, **extra: Any) -> dict[str, Any]:
        return {"shape": "1.7B", "method": method, "seq_len": 128, "layers": 24, "estimate_gib": 1.0, "peak_mib": peak,
                "setup_peak_mib": peak, "tokens_per_s": 5.0, "trainable_params": 18_087_936, "weights_dtype": "float32",
                "load": [1.0, 2.0], "wall_s": 60.0} | extra
    runs = [{"layers": n, "peak_mib": 1000.0 + 1000 * n, "tokens_per_s": 10.0 / n} for n in (2, 4, 6)]
    full = {"shape": "1.7B", "method": "full", "seq_len": 128, "layers": 24, "estimate_gib": 30.0, "skipped": "does not fit",
            "extrapolated": {"peak_mib": 25000.0, "tokens_per_s": None, "mib_per_layer": 1000.0, "mib_fixed": 1000.0, "from": runs,
                             "trainable_params": 1_711_376_384}}
    cells = [cell("lora", 10000.0), cell("qlora", 5000.0), full]
    args = argparse.Namespace(argv=[], batch=1, steps=1, threads=1, seq_lens=[128])
    info = {"cpu": "cpu", "cpus": 2, "ram_gib": 23.5, "torch": "t", "transformers": "t"}
    text = shapes.report(cells, args, info, (1.0, 1.0), 1.0)
    assert "QLoRA ≤ 0.6× LoRA peak memory at 1.7B, seq 128: **met** — 0.50×" in text
    assert "LoRA ≤ 0.25× full fine-tuning's peak memory at 1.7B, seq 128: **not met** — 0.40× (full: extrapolated)" in text
    assert "~25000 (extrapolated) — **does not fit**" in text and "– (no fit)" in text
