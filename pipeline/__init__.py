"""bancache: Born-Again Networks and knowledge distillation with an offline logit cache."""

__version__ = "0.1.0"
