"""The logit store: its format, the export that writes it, the readers and streaming that serve it, conversion."""
