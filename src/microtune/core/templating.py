"""One Jinja2 template set for every HTML page microtune writes (the eval report, the synth fidelity report).

    from microtune.core.templating import render
    html = render("eval/report.html", report=context)        # a whole page
    html = render("eval/report_body.html", report=context)   # the same report's body only, to embed in another page
    share(studio_env)                                         # another Environment may then include these templates

The templates live in ``core/templates/`` (package data: the wheel carries them). Why here, on floor 0: two
stages (evaluation, synthesis) render pages and must not import each other, and a page renderer on a higher
floor (a web studio) can embed their bodies with the same macros. Shared pieces:

- ``page.html``: the page shell (title, style block, body block) every standalone page extends;
- ``macros.html``: ``table`` (header + rows, a ``call`` block for rich cells), ``interval`` (value [low, high]),
  ``plot`` (an inline base64 PNG, or why there is none), ``kv_table`` (caption + key/value rows);
- filters ``num`` (— for missing, nan, fixed digits), ``pvalue`` (<0.001 below the table's precision), ``b64``.

Autoescape is on for every template: a label, input text or title that holds ``<script>`` is shown, never run.
``StrictUndefined``: a template that names a missing value fails loudly instead of printing nothing.
"""
from __future__ import annotations

import base64
import functools
from typing import Any


def num(value: Any, digits: int = 3) -> str:
    """A table cell's number: ``—`` when missing, ``nan`` for NaN, floats at ``digits`` decimals, anything else as text."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return "nan" if value != value else f"{value:.{digits}f}"
    return str(value)


def pvalue(value: float | None) -> str:
    """A p-value at three decimals; below 0.001 it is shown as ``<0.001`` (three decimals would say 0.000)."""
    if value is None:
        return "—"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def b64(data: bytes) -> str:
    """Bytes as base64 text, for ``data:`` URLs (plots are inlined so a report is one self-contained file)."""
    return base64.b64encode(data).decode()


FILTERS = {"num": num, "pvalue": pvalue, "b64": b64}


def _package_loader() -> Any:
    import jinja2  # imported on first render: `import microtune` stays fast

    return jinja2.PackageLoader("microtune.core", "templates")


@functools.lru_cache(maxsize=1)
def environment() -> Any:
    """The shared ``jinja2.Environment``: package templates, autoescape on, strict undefined, the filters above."""
    import jinja2

    env = jinja2.Environment(loader=_package_loader(), autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters.update(FILTERS)
    return env


def share(env: Any) -> Any:
    """Let another page renderer's ``jinja2.Environment`` (a web studio's) include these templates, e.g.
    ``{% include "eval/report_body.html" %}``: its own loader is asked first, then the package's; the filters are added.
    Returns ``env``. Its autoescape setting stays its own: keep it on for these templates."""
    import jinja2

    env.loader = jinja2.ChoiceLoader([env.loader, _package_loader()]) if env.loader else _package_loader()
    env.filters.update(FILTERS)
    return env


def render(template: str, **context: Any) -> str:
    """Render one package template (a path under ``core/templates/``) with ``context``."""
    return environment().get_template(template).render(**context)
