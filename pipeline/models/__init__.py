"""Architectures (one registry), checkpoints, and inference (predict_logits, accuracy)."""
