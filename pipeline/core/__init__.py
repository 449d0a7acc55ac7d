"""Foundation: errors, atomic files, project paths, statistics, torch.distributed helpers. Imports no other part."""
