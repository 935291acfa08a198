"""Registry: MLflow tracking (params, metrics, artifacts) and the model registry."""
from microtune.registry.tracking import (
    flatten,
    log_folder,
    log_metrics,
    log_params,
    mlflow_run,
    model_versions,
    register_adapter,
    tracking_uri,
)

__all__ = ["flatten", "log_folder", "log_metrics", "log_params", "mlflow_run", "model_versions",
           "register_adapter", "tracking_uri"]
