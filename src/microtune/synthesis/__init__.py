"""Synthetic data: a teacher writes more examples; a filter cascade and fidelity tests keep them honest.

    microtune synth recipes/banking-intents.yaml --set synth.teacher.base_url=http://127.0.0.1:8000/v1

Modules: ``teacher`` (OpenAI-compatible client, retries, accounting), ``cache`` (SQLite answers),
``plan`` (holdout, quotas, exemplar rotation, prompts, answer parsing), ``filters`` (the cascade),
``fidelity`` (tests against held-out real rows), ``stage`` (the whole stage) and ``mix`` (what
`train` adds to the real rows).
"""
from microtune.synthesis.mix import synthetic_for_training
from microtune.synthesis.stage import generate, synth_config, synth_hooks
from microtune.synthesis.teacher import resolve_endpoint as teacher_endpoint

__all__ = ["generate", "synth_config", "synth_hooks", "synthetic_for_training", "teacher_endpoint"]
