"""report.html from the shared Jinja2 templates: labels and inputs are escaped, the body embeds in another page, and
the templates ship in the wheel. The eval folder is written by hand (no model), so these run in seconds."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from microtune.core.templating import environment, num, pvalue, render, share
from microtune.evaluation.report import SECTIONS, render_report, report_context

EVIL = "<script>alert('x')</script>"
ROOT = Path(__file__).resolve().parents[2]


def _eval_folder(folder: Path) -> Path:
    """A classify eval artifact's three files, with a hostile label and input text."""
    labels = [EVIL, "refund"]
    rows = [{"source": f"t.jsonl:{i}", "text": f"{EVIL} row {i}", "gold": labels[i % 2],
             "micro": {"pred": labels[(i + 1) % 2] if i < 2 else labels[i % 2], "prob": 0.9},
             "zero_shot": {"pred": None if i == 0 else EVIL, "prob": None}} for i in range(4)]
    folder.mkdir()
    (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    system = {"accuracy": 0.5, "macro_f1": 0.5, "per_label_f1": {EVIL: 0.5, "refund": 0.5}, "valid_rate": 1.0, "latency_n": 0,
              "ci": {"accuracy": [0.0, 1.0], "macro_f1": [0.0, 1.0], "valid_rate": [1.0, 1.0]}, "cost_basis": EVIL}
    (folder / "metrics.json").write_text(json.dumps({"zero_shot": system | {"p_value_vs_micro": 0.0004}, "micro": system}))
    stats = {"confidence": 0.95, "n_resamples": 10, "seed": 13, "interval_method": "percentile bootstrap", "paired_test": "McNemar mid-p",
             "latency_method": "alone", "endpoint_latency_method": "sequential",
             "comparisons": {"zero_shot": {"mcnemar": {"b": 1, "c": 2, "p_value": 0.5, "mid_p": 0.0002},
                                           "metrics": {"accuracy": {"delta": 0.25, "p_value": 0.3}}}}}
    (folder / "stats.json").write_text(json.dumps(stats))
    return folder


def test_a_script_label_and_input_are_escaped_in_the_eval_report(tmp_path: Path) -> None:
    page = render_report(_eval_folder(tmp_path / "ev")).read_text()
    assert "<script>" not in page and "alert(&#39;x&#39;)" in page
    assert page.count("&lt;script&gt;") >= 5  # worst-errors input, gold, predictions, the cost note
    for section in SECTIONS:
        assert f">{section}</h2>" in page
    # the numbers as before: interval cells, p-values below the table's precision, the invalid answer
    assert "0.500 <span class=ci>[0.000, 1.000]</span>" in page and "exact 0.500, mid-p &lt;0.001" in page
    assert "<i>(invalid)</i>" in page and "Δ = +0.250" in page and "only micro right 1, only zero_shot right 2" in page


def test_the_report_body_embeds_in_another_page_without_the_shell(tmp_path: Path) -> None:
    context = report_context(_eval_folder(tmp_path / "ev"))
    body = render("eval/report_body.html", report=context)
    assert "<html" not in body and "<h1>" not in body and all(f">{s}</h2>" in body for s in SECTIONS)
    studio = environment().from_string('<main>{% include "eval/report_body.html" %}</main>').render(report=context)
    assert studio.startswith("<main>") and ">Worst errors</h2>" in studio and "<script>" not in studio
    # a studio's own Environment, with its own templates, shares ours: its page includes the body
    from jinja2 import DictLoader, Environment

    own = share(Environment(loader=DictLoader({"run.html": '<section>{% include "eval/report_body.html" %}</section>'}), autoescape=True))
    embedded = own.get_template("run.html").render(report=context)
    assert embedded.startswith("<section>") and ">Paired tests</h2>" in embedded and "&lt;script&gt;" in embedded and "<script>" not in embedded


def test_the_shared_filters_format_like_the_tables_did() -> None:
    assert [num(None), num(float("nan")), num(0.12345), num(0.12345, 1), num(7)] == ["—", "nan", "0.123", "0.1", "7"]
    assert [pvalue(None), pvalue(0.0004), pvalue(0.25)] == ["—", "<0.001", "0.250"]
    from jinja2 import UndefinedError

    with pytest.raises(UndefinedError, match="has no attribute 'sections'"):  # StrictUndefined: an error, not an empty page
        render("eval/report_body.html", report={})


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None, reason="hatchling reads .gitignore through the source tree")
def test_the_wheel_carries_the_templates(tmp_path: Path) -> None:
    pytest.importorskip("hatchling")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
                   check=True, capture_output=True)
    names = zipfile.ZipFile(next(tmp_path.glob("microtune-*.whl"))).namelist()
    shipped = {n.split("core/templates/")[1] for n in names if "core/templates/" in n}
    assert {"page.html", "macros.html", "eval/report.html", "eval/report_body.html", "eval/report.css", "synth/fidelity.html"} <= shipped
