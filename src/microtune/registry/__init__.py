"""Registry: MLflow tracking (params, metrics, artifacts) and the model registry; W&B and TensorBoard mirrors (trackers)."""
from microtune.registry.trackers import TrackedRun, Tracker, require_backends, tracked_run
from microtune.registry.tracking import (
    flatten,
    log_folder,
    log_metrics,
    log_params,
    mlflow_run,
    model_versions,
    recipe_params,
    register_adapter,
    tracking_uri,
)

__all__ = ["TrackedRun", "Tracker", "flatten", "log_folder", "log_metrics", "log_params", "mlflow_run", "model_versions",
           "recipe_params", "register_adapter", "require_backends", "tracked_run", "tracking_uri"]
