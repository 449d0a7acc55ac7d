"""Stage `control` (generation K >= 1): params train, students.K and train_controls.

With `train_controls: true`, trains control-K (labels only, generation K's seed, initial weights and batch
order; `pipeline.train.controls`) into controls/gen-K/: model.pt, test_logits.npy (float32, test rows in order)
and metrics.json. With `train_controls: false` (the default) it writes only metrics.json saying so, so that
`dvc repro` costs nothing extra. `bancache report` reads controls/ for the paired table.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.core.devices import resolve_device
from pipeline.core.errors import ParamsError
from pipeline.core.files import atomic_path, write_json
from pipeline.core.machine import with_machine
from pipeline.core.paths import ProjectPaths
from pipeline.data.prepared import load_prepared
from pipeline.models.checkpoint import save_checkpoint
from pipeline.models.predict import predict_accuracy
from pipeline.params import TrainParams, parse_generation, parse_section
from pipeline.train.controls import control_params, train_control
from pipeline.train.loop import checkpoint_meta
from stages.common import ParamsFile
from stages.progress import Progress
from stages.train import epoch_hook


def enabled(params: ParamsFile) -> bool:
    value = params.get("train_controls")
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ParamsError(
            f"train_controls = {value!r}: expected true or false (train a label-only control per student)"
        )
    return value


def run(params: ParamsFile, layout: ProjectPaths, gen: int) -> dict[str, Any]:
    """Train control-`gen` into controls/gen-`gen`/ (or record that controls are off)."""
    layout.control_dir(gen).mkdir(parents=True, exist_ok=True)
    if not enabled(params):
        metrics: dict[str, Any] = {"generation": gen, "skipped": True, "why": "train_controls: false in params"}
        write_json(layout.control_metrics(gen), metrics)
        return metrics
    recipe = parse_section(TrainParams, "train", params.get("train"))
    raw = params.get(f"students.{gen}")
    if raw is None:
        raise ParamsError(f"--gen {gen}: params.yaml has no section students.'{gen}'; a control needs one")
    gp = parse_generation(gen, raw)
    data = load_prepared(layout.dataset)
    with Progress(f"control {gen}", recipe.epochs, unit="epoch") as bar:
        result = train_control(data, recipe, gen, gp, epoch_hook(bar))
    cp = control_params(recipe, gen, gp)
    meta = {**checkpoint_meta(data, recipe, gen, cp, None), "control_of": gen}
    save_checkpoint(layout.control_model(gen), result.model, {**meta, "selected_epoch": result.selected_epoch})
    device = resolve_device(recipe.device)
    logits, test_acc = predict_accuracy(result.model, data.x_test, data.y_test, recipe.eval_batch_size, device)
    with atomic_path(layout.control_logits(gen)) as tmp, open(tmp, "wb") as f:
        np.save(f, logits.astype(np.float32))
    metrics = {"generation": gen, "seed": cp.seed, "loss": "ce", "test_acc": test_acc}
    write_json(layout.control_metrics(gen), with_machine(metrics))
    return metrics
