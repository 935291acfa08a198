"""The package version, in the bottom layer so any module can record it (lineage, the CLI) without importing
``microtune`` itself, whose lazy public functions reach up into the pipeline."""
from __future__ import annotations

__version__ = "0.1.0"
