"""Pipelines: the stages as functions (check, train, evaluate, register, run)."""
from microtune.pipeline.stages import CheckResult, RunResult, check, evaluate, register, run, train

__all__ = ["CheckResult", "RunResult", "check", "evaluate", "register", "run", "train"]
