"""GGUF export: the file read back by transformers' GGUF loader gives the merged model's logits; the Modelfile is Ollama's.

Tolerances (a tiny random Llama whose logits reach about ±12, so the bounds are relative to the largest logit):
f32 is exact; f16 within 1 % of the largest logit and the same arg-max everywhere; q8_0 (8-bit blocks of 32
values) within 10 % and the same constrained labels.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from microtune.cli import app
from microtune.core.errors import InputError, ModelError
from microtune.models.gguf_file import check_architecture, check_gguf_type, rotary_rows
from microtune.models.ollama import chat_pieces, go_template

runner = CliRunner()
TEXTS = ["my card was charged twice", "where is my parcel", "i want my money back", "the invoice shows the wrong tax"]


@pytest.fixture(scope="module")
def trained() -> dict[str, Path]:
    return {}


def _train(trained: dict[str, Path], key: str, tmp_path: Path, make_recipe, tiny_model_dir: Path, **sections) -> Path:
    """One tiny adapter per method for the whole module (the tests only read them; training takes seconds)."""
    from microtune import pipeline

    if key not in trained:
        recipe = make_recipe(tiny_model_dir, train={"epochs": 4, "lr": 2e-2}, **sections)
        trained[key] = pipeline.train(recipe, workspace=tmp_path / "ws")
    return trained[key]


@pytest.fixture
def adapter(trained: dict[str, Path], tmp_path: Path, make_recipe, tiny_model_dir: Path) -> Path:
    return _train(trained, "lora", tmp_path, make_recipe, tiny_model_dir)


def _merged_and_prompts(adapter: Path, tiny_model_dir: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from microtune.tasks import ClassifyConfig, get_task
    from microtune.tasks.render import Renderer

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().eval()
    renderer = Renderer(AutoTokenizer.from_pretrained(adapter))
    labels = json.loads((adapter / "manifest.json").read_text())["labels"]
    task = get_task(ClassifyConfig(**json.loads((adapter / "recipe.json").read_text())["task"]), labels)
    return merged, renderer, task, [renderer.prompt_ids(task.messages({"text": t})) for t in TEXTS]


def _logits(model, prompts: list[list[int]]):
    import torch

    with torch.no_grad():
        return [model(input_ids=torch.tensor([p])).logits[0] for p in prompts]


def _read_back(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.mark.slow
def test_f16_gguf_reads_back_with_the_merged_models_logits_tokenizer_and_template(tmp_path: Path, adapter: Path,
                                                                                   tiny_model_dir: Path) -> None:
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    from microtune.models import LabelPredictor

    out = tmp_path / "out" / "toy.gguf"
    result = runner.invoke(app, ["export", str(adapter), "--gguf", str(out)])
    assert result.exit_code == 0, result.output
    assert "GGUF: " in result.output and "ollama create NAME -f" in result.output
    assert sorted(p.name for p in out.parent.iterdir()) == ["Modelfile", "toy.gguf"]  # no temp file left behind

    merged, renderer, task, prompts = _merged_and_prompts(adapter, tiny_model_dir)
    back = _read_back(out)
    for ours, theirs in zip(_logits(back, prompts), _logits(merged, prompts), strict=True):
        assert (ours - theirs).abs().max() <= 0.01 * theirs.abs().max()
        assert (ours.argmax(-1) == theirs.argmax(-1)).all()
    labels = LabelPredictor(back, renderer, task.candidates(), batch_size=2).predict(prompts)
    reference = LabelPredictor(merged, renderer, task.candidates(), batch_size=2).predict(prompts)
    assert [label for label, _ in labels] == [label for label, _ in reference]

    tokenizer = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    trained_tokenizer = AutoTokenizer.from_pretrained(adapter)
    assert tokenizer.chat_template == trained_tokenizer.chat_template
    text = renderer.prompt_text(task.messages({"text": TEXTS[0]}))
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == trained_tokenizer(text, add_special_tokens=False)["input_ids"]

    fields = GGUFReader(out).fields
    assert fields["general.architecture"].contents() == "llama" and fields["general.name"].contents() == "toy"
    assert fields["microtune.labels"].contents() == ["billing", "shipping", "refund"]
    assert fields["microtune.source_adapter"].contents() == str(adapter.resolve())
    assert "output.weight" not in {t.name for t in GGUFReader(out).tensors}  # tied embeddings: llama.cpp's way of saying so


@pytest.mark.exhaustive
@pytest.mark.slow
def test_q8_0_gguf_is_smaller_and_keeps_the_labels_within_the_looser_bound(tmp_path: Path, adapter: Path,
                                                                            tiny_model_dir: Path) -> None:
    from gguf import GGMLQuantizationType, GGUFReader

    from microtune.pipeline import export

    written = export(adapter, gguf=tmp_path / "toy-q8.gguf", gguf_type="q8_0")
    types = {t.name: t.tensor_type for t in GGUFReader(written["gguf"]).tensors}
    assert types["blk.0.attn_q.weight"] == GGMLQuantizationType.Q8_0 and types["blk.0.attn_norm.weight"] == GGMLQuantizationType.F32
    merged, renderer, task, prompts = _merged_and_prompts(adapter, tiny_model_dir)
    back = _read_back(written["gguf"])
    for ours, theirs in zip(_logits(back, prompts), _logits(merged, prompts), strict=True):
        assert (ours - theirs).abs().max() <= 0.10 * theirs.abs().max()
    from microtune.models import LabelPredictor

    labels = LabelPredictor(back, renderer, task.candidates(), batch_size=2).predict(prompts)
    reference = LabelPredictor(merged, renderer, task.candidates(), batch_size=2).predict(prompts)
    assert [label for label, _ in labels] == [label for label, _ in reference]
    assert written["modelfile"] == written["gguf"].with_name("Modelfile")
    assert "FROM ./toy-q8.gguf" in written["modelfile"].read_text()


@pytest.mark.slow
def test_modelfile_carries_template_stops_system_and_labels(tmp_path: Path, adapter: Path) -> None:
    from microtune.pipeline import export

    text = export(adapter, gguf=tmp_path / "toy.gguf", gguf_type="f32")["modelfile"].read_text()
    lines = text.splitlines()
    assert "FROM ./toy.gguf" in lines
    assert 'PARAMETER stop "<|im_end|>"' in lines and "PARAMETER temperature 0" in lines
    assert 'SYSTEM """Route the customer message."""' in lines
    assert "#   billing" in lines and "#   refund" in lines
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert '{{ "<|im_start|>system\\n" }}{{ .System }}{{ "<|im_end|>\\n" }}' in template
    assert '{{ "<|im_start|>user\\n" }}{{ .Content }}{{ "<|im_end|>\\n" }}' in template
    assert template.count('{{ "<|im_start|>assistant\\n" }}') == 3  # the assistant turn, and the generation prompt twice


@pytest.mark.slow
def test_a_failed_write_leaves_no_file_and_keeps_the_old_one(tmp_path: Path, adapter: Path, monkeypatch) -> None:
    from gguf import GGUFWriter

    from microtune.pipeline import export

    out = tmp_path / "toy.gguf"
    out.write_bytes(b"the previous export")

    def disk_full(self, **_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(GGUFWriter, "write_tensors_to_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export(adapter, gguf=out, force=True)
    assert out.read_bytes() == b"the previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy.gguf"]  # no temp file, no Modelfile for a GGUF that is not there


@pytest.mark.slow
def test_existing_outputs_are_kept_unless_forced(tmp_path: Path, adapter: Path) -> None:
    (tmp_path / "Modelfile").write_text("mine")
    result = runner.invoke(app, ["export", str(adapter), "--gguf", str(tmp_path / "toy.gguf")])
    assert result.exit_code == 2 and "Modelfile already exists" in result.output and "--force" in result.output
    assert (tmp_path / "Modelfile").read_text() == "mine" and not (tmp_path / "toy.gguf").exists()
    result = runner.invoke(app, ["export", str(adapter), "--gguf", str(adapter / "x.gguf")])
    assert result.exit_code == 2 and "inside the adapter folder" in result.output


@pytest.mark.slow
def test_merge_and_gguf_together_share_one_float32_merge(tmp_path: Path, adapter: Path, tiny_model_dir: Path) -> None:
    """--merge at bf16 with an f32 GGUF: the GGUF holds the float32 merge exactly (it is written before --merge casts
    the shared merged model to its --dtype), and the merged folder is bf16."""
    import torch
    from transformers import AutoModelForCausalLM

    out, folder = tmp_path / "toy.gguf", tmp_path / "merged"
    result = runner.invoke(app, ["export", str(adapter), "--merge", str(folder), "--dtype", "bfloat16",
                                 "--gguf", str(out), "--gguf-type", "f32"])
    assert result.exit_code == 0, result.output
    merged, _, _, prompts = _merged_and_prompts(adapter, tiny_model_dir)
    for ours, theirs in zip(_logits(_read_back(out), prompts), _logits(merged, prompts), strict=True):
        assert torch.allclose(ours, theirs, atol=1e-4)
    assert AutoModelForCausalLM.from_pretrained(folder).dtype == torch.bfloat16


@pytest.mark.slow
def test_prompt_tuning_is_refused_with_the_reason_and_the_alternative(trained: dict[str, Path], tmp_path: Path,
                                                                      make_recipe, tiny_model_dir: Path) -> None:
    prompt = _train(trained, "prompt_tuning", tmp_path, make_recipe, tiny_model_dir,
                    method={"kind": "prompt_tuning", "num_virtual_tokens": 4})
    result = runner.invoke(app, ["export", str(prompt), "--gguf", str(tmp_path / "pt.gguf")])
    assert result.exit_code == 2
    assert "trained with prompt_tuning: its virtual tokens are not weights that can be merged" in result.output
    assert "microtune serve" in result.output and "lora" in result.output
    assert not (tmp_path / "pt.gguf").exists() and not (tmp_path / "Modelfile").exists()


@pytest.mark.exhaustive
@pytest.mark.slow
def test_a_full_fine_tune_exports_its_own_weights(trained: dict[str, Path], tmp_path: Path, make_recipe,
                                                  tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    full = _train(trained, "full", tmp_path, make_recipe, tiny_model_dir, method={"kind": "full"})
    result = runner.invoke(app, ["export", str(full), "--gguf", str(tmp_path / "full.gguf"), "--gguf-type", "f32"])
    assert result.exit_code == 0, result.output
    ours = _logits(_read_back(tmp_path / "full.gguf"), [[1, 2, 3, 4]])[0]
    theirs = _logits(AutoModelForCausalLM.from_pretrained(full).eval(), [[1, 2, 3, 4]])[0]
    base = _logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), [[1, 2, 3, 4]])[0]
    assert (ours - theirs).abs().max() <= 1e-4 < (theirs - base).abs().max()


def test_q4_k_is_refused_with_the_llama_quantize_command() -> None:
    with pytest.raises(InputError, match="cannot write it") as err:
        check_gguf_type("q4_k")
    assert "llama-quantize" in err.value.hint and "f16" in err.value.hint
    assert check_gguf_type("Q8_0") == "q8_0"
    with pytest.raises(InputError, match="unknown type 'q3'"):
        check_gguf_type("q3")


def test_cli_refuses_gguf_options_that_would_do_nothing_or_cannot_be_written(tmp_path: Path) -> None:
    result = runner.invoke(app, ["export", str(tmp_path), "--merge", str(tmp_path / "m"), "--gguf-type", "q8_0"])
    assert result.exit_code == 2 and "--gguf-type sets the GGUF file's weight type, but no --gguf OUT.gguf was given" in result.output
    result = runner.invoke(app, ["export", "--help"])
    assert "--gguf" in result.output and "q4_k" in result.output and "llama-quantize" in result.output


def test_only_plain_llama_blocks_are_written() -> None:
    from transformers import GPT2Config, LlamaConfig

    with pytest.raises(ModelError, match="Llama-architecture models only; this model is 'gpt2'"):
        check_architecture(GPT2Config())
    with pytest.raises(ModelError, match="attention_bias"):
        check_architecture(LlamaConfig(attention_bias=True))
    check_architecture(LlamaConfig())


def test_rotary_rows_is_the_inverse_of_transformers_gguf_loader() -> None:
    import numpy as np
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    weight = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)  # 8 heads of 16 rows
    loader = LlamaTensorProcessor(config={"num_attention_heads": 8, "num_key_value_heads": 8})
    back = loader.process(rotary_rows(weight, 8), "blk.0.attn_q.weight").weights
    assert np.array_equal(back, weight) and not np.array_equal(rotary_rows(weight, 8), weight)


def test_chatml_template_becomes_per_role_pieces_that_rebuild_it(tokenizer) -> None:
    pieces = chat_pieces(tokenizer)
    assert pieces is not None
    assert pieces.before == {"system": "<|im_start|>system\n", "user": "<|im_start|>user\n", "assistant": "<|im_start|>assistant\n"}
    assert set(pieces.after.values()) == {"<|im_end|>\n"} and pieces.generation == "<|im_start|>assistant\n"
    assert pieces.default_system.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    assert pieces.render(messages) == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    template = go_template(pieces)
    assert template.startswith("{{- if .Messages -}}") and '{{ if ne (index .Messages 0).Role "system" }}' in template
    assert template.count("{{-") == 3 and "{{ .Prompt }}" in template  # trimming only around the template's own newlines


def test_a_template_that_is_not_a_wrapper_per_role_gets_no_translation(tokenizer) -> None:
    import copy

    odd = copy.copy(tokenizer)
    odd.chat_template = ("{% for m in messages %}{{ loop.index }}:{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}>{% endif %}")  # numbers the turns: no fixed text per role
    assert chat_pieces(odd) is None
