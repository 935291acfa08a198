"""Pipelines: the stages as functions (check, train, evaluate, register, report, run)."""
from microtune.pipeline.stages import CheckResult, RunResult, check, evaluate, register, report, run, train

__all__ = ["CheckResult", "RunResult", "check", "evaluate", "register", "report", "run", "train"]
