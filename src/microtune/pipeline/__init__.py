"""The pipeline: one module per step, each a plain function; the CLI and ``import microtune`` are shells over them.

    check → (synth) → train → evaluate → register → gate;  run chains them;  watch retrains on new data;
    tune searches the recipe's hyper-parameters (trials scored on the valid split);
    export and serve ship a trained adapter;  predict answers the rows of a file with one;
    list_models / list_versions / show_version / promote / rollback read and move the registry's aliases.

Modules import each other downwards only (run → train/evaluate/register/gate → check; watch → run/gate;
synth → local_teacher → train; predict → versions), never in a cycle (tests/test_layers.py checks it). Every step module is
imported here, before the functions are bound, so a step module can never shadow its function
(``microtune.pipeline.train`` stays the function even after ``import microtune.pipeline.train``).
"""
from microtune.pipeline.check import CheckResult, check
from microtune.pipeline.evaluate import evaluate, report
from microtune.pipeline.export import export
from microtune.pipeline.gate import gate, promote, rollback
from microtune.pipeline.predict import PredictResult, predict
from microtune.pipeline.recipes import RecipeLike, resolve_recipe
from microtune.pipeline.register import register
from microtune.pipeline.run import RunResult, run
from microtune.pipeline.serve import serve
from microtune.pipeline.synth import synth
from microtune.pipeline.train import train
from microtune.pipeline.tune import TuneResult, tune
from microtune.pipeline.versions import RegisteredModel, list_models, list_versions, show_version
from microtune.pipeline.watch import watch, watch_loop, watch_once

__all__ = ["CheckResult", "PredictResult", "RecipeLike", "RegisteredModel", "RunResult", "check", "evaluate", "export", "gate",
           "list_models", "list_versions", "predict", "promote", "register", "report", "resolve_recipe", "rollback", "run", "serve", "show_version",
           "synth", "train", "tune", "TuneResult", "watch", "watch_loop", "watch_once"]
