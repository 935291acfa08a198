"""The one pattern for micro-model names, shared by everything that accepts or looks up a name.

A recipe's ``name`` becomes a workspace folder, a registered MLflow model, a served model id and a vLLM
``--lora-modules NAME=PATH`` entry, so all of them must accept exactly the same names: letters, digits
and ``-_.``, starting with a letter or digit, at most 64 characters. That keeps a name usable as a path
part, unambiguous next to ``=``, ``@`` and ``/``, and free of quotes (registry searches embed it).
"""
from __future__ import annotations

import re

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
NAME_RULE = "letters, digits and -_. (starting with a letter or digit, at most 64)"
_NAME = re.compile(NAME_PATTERN)


def is_valid_name(name: str) -> bool:
    return _NAME.match(name) is not None
