"""Training stage: LoRA fine-tuning with completion-only loss (see engine.py)."""
from microtune.train.engine import completion_loss, train_adapter

__all__ = ["completion_loss", "train_adapter"]
