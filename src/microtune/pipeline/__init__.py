"""Pipelines: the stages as functions (check, synth, train, evaluate, register, report, run)."""
from microtune.pipeline.stages import CheckResult, RunResult, check, evaluate, register, report, run, synth, train

__all__ = ["CheckResult", "RunResult", "check", "evaluate", "register", "report", "run", "synth", "train"]
