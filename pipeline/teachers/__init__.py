"""Teachers: a teacher model run over the prepared data into its logit store (`export_logits`)."""
