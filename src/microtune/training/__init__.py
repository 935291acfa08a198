"""Training stage: LoRA fine-tuning with completion-only loss (see engine.py)."""
from microtune.training.engine import completion_loss, train_adapter

__all__ = ["completion_loss", "train_adapter"]
