"""bancache: Born-Again Networks and knowledge distillation with an offline logit cache.

The Python API (see README, "Python API"); names are imported on first use, so `import pipeline` stays
light (pipeline.train.loop and pipeline.teachers.export are the modules behind train_model and export_store):

    prepare_data(path, *, params=DataParams(...)) -> PreparedData
    train_model(data, *, gen, recipe=TrainParams(...), generation=GenParams(...), teacher_store=None, out=None)
    export_store(checkpoint, data, out, *, params=ExportParams(...), device="auto") -> store attributes
    open_targets(store, split="train", *, data=None, view=0) -> CachedTargets (len, .rows, .target)
    load_model(checkpoint) -> the trained nn.Module (eval mode); load_checkpoint(path) -> its dict and meta
    load_prepared(path), LogitStore, losses: ban_loss, kd_loss, generation_loss, ...
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "prepare_data": "pipeline.api",
    "train_model": "pipeline.api",
    "export_store": "pipeline.api",
    "open_targets": "pipeline.api",
    "load_model": "pipeline.api",
    "load_checkpoint": "pipeline.models.checkpoint",
    "model_from_checkpoint": "pipeline.models.checkpoint",
    "load_prepared": "pipeline.data.prepared",
    "PreparedData": "pipeline.data.prepared",
    "CachedTargets": "pipeline.cache.reader",
    "LogitStore": "pipeline.cache.store",
    "DataParams": "pipeline.params",
    "TrainParams": "pipeline.params",
    "GenParams": "pipeline.params",
    "ExportParams": "pipeline.params",
    "TrainResult": "pipeline.train.loop",
    "EpochLog": "pipeline.train.loop",
    "ban_loss": "pipeline.losses",
    "ban_l_loss": "pipeline.losses",
    "kd_loss": "pipeline.losses",
    "cwtm_loss": "pipeline.losses",
    "dkpp_loss": "pipeline.losses",
    "dkd_loss": "pipeline.losses",
    "mse_loss": "pipeline.losses",
    "ce_loss": "pipeline.losses",
    "generation_loss": "pipeline.losses",
    "soften": "pipeline.losses",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
