"""Export: the merged model equals base + adapter, the vLLM bundle is complete, the CLI refuses bad input."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from microtune.cli import app
from microtune.core.errors import ArtifactError, InputError
from microtune.models.export import merge_adapter, vllm_bundle, vllm_spec

runner = CliRunner()
TEXTS = ["my card was charged twice", "where is my parcel", "i want my money back", "the invoice shows the wrong tax"]


@pytest.fixture(scope="module")
def trained() -> dict[str, Path]:
    return {}


@pytest.fixture
def adapter(trained: dict[str, Path], tmp_path: Path, make_recipe, tiny_model_dir: Path) -> Path:
    """One tiny adapter trained for the whole module (the tests only read it; training takes seconds)."""
    from microtune import pipeline

    if "dir" not in trained:
        recipe = make_recipe(tiny_model_dir, train={"epochs": 4, "lr": 2e-2})
        trained["dir"] = pipeline.train(recipe, workspace=tmp_path / "ws")
    return trained["dir"]


def _logits(model, prompts: list[list[int]]):
    import torch

    with torch.no_grad():
        return [model(input_ids=torch.tensor([p])).logits[0] for p in prompts]


@pytest.mark.slow
def test_merged_model_gives_the_logits_and_labels_of_base_plus_adapter(tmp_path: Path, adapter: Path,
                                                                         tiny_model_dir: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from microtune.models import LabelPredictor
    from microtune.tasks import ClassifyConfig, get_task
    from microtune.tasks.render import Renderer

    out = merge_adapter(adapter, tmp_path / "merged")
    manifest = json.loads((out / "manifest.json").read_text())
    source = json.loads((adapter / "manifest.json").read_text())
    assert manifest["kind"] == "merged" and manifest["source_adapter"] == str(adapter.resolve())
    assert manifest["lineage"] == source["lineage"] and manifest["labels"] == source["labels"]
    assert (out / "model.safetensors").is_file() and (out / "chat_template.jinja").is_file()
    assert not list(tmp_path.glob(".merged*"))  # no temp folder left behind

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.dtype == torch.float32 and not hasattr(merged, "peft_config")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    renderer = Renderer(AutoTokenizer.from_pretrained(out))
    task = get_task(ClassifyConfig(**json.loads((adapter / "recipe.json").read_text())["task"]), source["labels"])
    prompts = [renderer.prompt_ids(task.messages({"text": t})) for t in TEXTS]
    base_logits = _logits(base, prompts)
    with_adapter = PeftModel.from_pretrained(base, str(adapter)).eval()
    for m, a, b in zip(_logits(merged, prompts), _logits(with_adapter, prompts), base_logits, strict=True):
        assert torch.allclose(m, a, atol=1e-4, rtol=1e-4)  # fp32: W + BA vs W and BA apart round differently
        assert (a - b).abs().max() > 1e-2  # the adapter changes the model: the comparison is not vacuous

    ours = LabelPredictor(merged, renderer, task.candidates(), batch_size=2).predict(prompts)
    theirs = LabelPredictor(with_adapter, renderer, task.candidates(), batch_size=2).predict(prompts)
    assert [label for label, _ in ours] == [label for label, _ in theirs]
    assert [p for _, p in ours] == pytest.approx([p for _, p in theirs], abs=1e-5)


@pytest.mark.slow
def test_merge_casts_to_the_dtype_asked_for(tmp_path: Path, adapter: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    out = merge_adapter(adapter, tmp_path / "merged-bf16", dtype="bfloat16")
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16
    assert json.loads((out / "manifest.json").read_text())["dtype"] == "bfloat16"


def test_cli_needs_merge_or_vllm(tmp_path: Path) -> None:
    result = runner.invoke(app, ["export", str(tmp_path)])
    assert result.exit_code == 2
    assert "export needs --merge OUT, --vllm OUT and/or --gguf OUT.gguf" in result.output


def test_cli_refuses_a_folder_that_is_not_an_adapter(tmp_path: Path) -> None:
    result = runner.invoke(app, ["export", str(tmp_path), "--merge", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert f"{tmp_path} is not a microtune adapter artifact (no manifest.json)" in result.output
    assert not (tmp_path / "out").exists()
    with pytest.raises(ArtifactError):
        vllm_bundle(tmp_path, tmp_path / "out")


@pytest.mark.slow
def test_cli_keeps_an_existing_out_unless_forced(tmp_path: Path, adapter: Path) -> None:
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["export", str(adapter), "--vllm", str(out)])
    assert result.exit_code == 2
    assert f"--vllm {out} already exists and is not empty" in result.output and "--force" in result.output
    assert (out / "keep.txt").read_text() == "mine"

    result = runner.invoke(app, ["export", str(adapter), "--vllm", str(out), "--force"])
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "vllm.json").is_file()
    assert "vllm serve" in result.output and "request.json" in result.output and "MICROTUNE_BASE_MODEL=" in result.output


@pytest.mark.slow
def test_cli_refuses_options_that_would_do_nothing(tmp_path: Path, adapter: Path) -> None:
    result = runner.invoke(app, ["export", str(adapter), "--vllm", str(tmp_path / "v"), "--dtype", "bfloat16"])
    assert result.exit_code == 2 and "--dtype sets the merged model's dtype, but no --merge OUT was given" in result.output
    result = runner.invoke(app, ["export", str(adapter), "--merge", str(tmp_path / "m"), "--dtype", "fp8"])
    assert result.exit_code == 2 and "unknown dtype 'fp8'" in result.output
    result = runner.invoke(app, ["export", str(adapter), "--merge", str(adapter.parent), "--force"])
    assert result.exit_code == 2 and "that folder holds the adapter itself" in result.output
    assert not (tmp_path / "v").exists() and not (tmp_path / "m").exists() and adapter.is_dir()


@pytest.mark.slow
def test_vllm_bundle_serves_the_lora_adapter(tmp_path: Path, adapter: Path) -> None:
    from peft import PeftConfig

    result = runner.invoke(app, ["export", str(adapter), "--vllm", str(tmp_path / "vllm")])
    assert result.exit_code == 0, result.output
    out = (tmp_path / "vllm").resolve()
    spec = json.loads((out / "vllm.json").read_text())
    lineage = json.loads((adapter / "manifest.json").read_text())["lineage"]
    r = json.loads((adapter / "adapter_config.json").read_text())["r"]
    base = lineage["base_model_source"]
    assert spec["base_model"] == base and spec["max_lora_rank"] == r == 16
    assert spec["lora_modules"] == [{"name": "toy", "path": str(out), "base_model_name": base}]
    assert spec["command"] == (f"vllm serve {base} --enable-lora --lora-modules toy={out} --max-lora-rank 16 "
                               f"--chat-template {out}/chat_template.jinja")  # vLLM renders prompts with training's template
    assert spec["chat_template"] == f"{out}/chat_template.jinja"
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (adapter / name).read_bytes()
    config = PeftConfig.from_pretrained(str(out))
    assert config.peft_type.value == "LORA" and config.r == r
    assert json.loads((out / "manifest.json").read_text())["kind"] == "vllm"


@pytest.mark.slow
def test_vllm_bundle_carries_the_labels_and_the_request_that_constrains_them(tmp_path: Path, adapter: Path) -> None:
    """Real vLLM (benchmarks/vllm_bundle.py) answers this very request.json; here: it holds what a client needs."""
    out = vllm_bundle(adapter, tmp_path / "vllm")
    spec = json.loads((out / "vllm.json").read_text())
    labels = json.loads((adapter / "manifest.json").read_text())["labels"]
    request = json.loads((out / "request.json").read_text())
    assert spec["task"] == "classify" and spec["labels"] == spec["answers"] == labels and request == spec["request"]
    assert request["structured_outputs"] == {"choice": labels}  # vLLM's guided decoding over the label list
    assert request["model"] == "toy" and request["temperature"] == 0
    assert request["messages"] == [{"role": "system", "content": "Route the customer message."},
                                   {"role": "user", "content": "REPLACE WITH THE INPUT TEXT"}]
    assert request["max_tokens"] == max(len(x.encode()) for x in labels) + 1  # any spelling fits: the grammar ends the answer
    trained_on = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert spec["trained_base"] == str(Path(trained_on).resolve())
    readme = (out / "README.md").read_text()
    assert "structured_outputs.choice" in readme and "guided_choice" in readme and "request.json" in readme
    assert f"MICROTUNE_BASE_MODEL={spec['trained_base']} ./serve.sh" in readme


@pytest.mark.slow
def test_vllm_request_of_an_extract_model_constrains_to_its_schema(tmp_path: Path, adapter: Path) -> None:
    from microtune.models.export import vllm_request

    extract = tmp_path / "extract-adapter"
    shutil.copytree(adapter, extract)
    recipe = json.loads((extract / "recipe.json").read_text())
    recipe["task"] = {"type": "extract", "instruction": "Pull the order id.", "fields": {"order_id": "the order number"}}
    (extract / "recipe.json").write_text(json.dumps(recipe))
    made = vllm_request(extract, {"labels": None}, "orders")
    schema = made["request"]["structured_outputs"]["json"]
    assert made["task"] == "extract" and made["answers"] is None and schema["required"] == ["order_id"]
    assert made["request"]["max_tokens"] > 0 and made["request"]["messages"][0]["content"] == "Pull the order id."


@pytest.mark.slow
def test_serve_script_finds_the_adapter_after_the_bundle_moves(tmp_path: Path, adapter: Path) -> None:
    bundle = vllm_bundle(adapter, tmp_path / "vllm", name="support-router")
    moved = Path(shutil.move(str(bundle), tmp_path / "elsewhere")).resolve()
    fake_bin = tmp_path / "bin"  # stands in for the vllm executable: prints the arguments it got
    fake_bin.mkdir()
    (fake_bin / "vllm").write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    (fake_bin / "vllm").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "MICROTUNE_BASE_MODEL"} | {"PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run([f"{moved}/serve.sh", "--port", "8001"], capture_output=True, text=True, env=env, check=True)
    base = json.loads((moved / "vllm.json").read_text())["base_model"]
    tail = ["--enable-lora", "--lora-modules", f"support-router={moved}", "--max-lora-rank", "16",
            "--chat-template", f"{moved}/chat_template.jinja", "--port", "8001"]
    assert done.stdout.splitlines() == ["serve", base, *tail]
    # MICROTUNE_BASE_MODEL swaps the base (e.g. the weights the adapter was trained on, offline); the rest stays
    env["MICROTUNE_BASE_MODEL"] = "/models/trained-on"
    done = subprocess.run([f"{moved}/serve.sh", "--port", "8001"], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.splitlines() == ["serve", "/models/trained-on", *tail]


@pytest.mark.slow
def test_vllm_refuses_an_adapter_that_is_not_lora(tmp_path: Path, adapter: Path, tiny_model_dir: Path) -> None:
    from peft import IA3Config, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    ia3 = tmp_path / "ia3-adapter"
    shutil.copytree(adapter, ia3)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    get_peft_model(model, IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=["k_proj", "v_proj", "down_proj"],
                                    feedforward_modules=["down_proj"])).save_pretrained(ia3)
    with pytest.raises(InputError, match="holds a PEFT IA3 adapter; vLLM serves LoRA adapters only"):
        vllm_bundle(ia3, tmp_path / "vllm")
    assert not (tmp_path / "vllm").exists()


def test_vllm_rank_rounds_up_to_what_vllm_accepts() -> None:
    assert vllm_spec("org/base", "m", Path("/a"), 4)["max_lora_rank"] == 8
    assert vllm_spec("org/base", "m", Path("/a"), 64)["max_lora_rank"] == 64
    with pytest.raises(InputError, match="above the 512 vLLM serves"):
        vllm_spec("org/base", "m", Path("/a"), 600)
