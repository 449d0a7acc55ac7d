"""Stage `train` (generation K): params train and gen0 (K = 0) or students.K."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import asdict
from typing import Any

from pipeline.data import load_prepared
from pipeline.distributed import barrier
from pipeline.errors import ParamsError
from pipeline.evaluate import accuracy, predict_logits, resolve_device
from pipeline.io import write_json, write_text
from pipeline.layout import Layout
from pipeline.params import TrainParams, parse_generation, parse_section
from pipeline.store import LogitStore
from pipeline.train import checkpoint_meta, save_generation, train_generation
from stages.common import ParamsFile
from stages.launch import worker_context


def gen_section(gen: int) -> str:
    return "gen0" if gen == 0 else f"students.{gen}"


def run(params: ParamsFile, layout: Layout, gen: int, resume: bool = False) -> dict[str, Any]:
    """Train generation `gen`; with `resume`, continue a killed run of the same config from its last epoch."""
    recipe = parse_section(TrainParams, "train", params.get("train"))
    raw = params.get(gen_section(gen))
    if gen != 0 and raw is None:
        raise ParamsError(
            f"--gen {gen}: params.yaml has no section students.'{gen}' (generation {gen}); "
            "add it or pick another generation"
        )
    gp = parse_generation(gen, raw)
    data = load_prepared(layout.dataset)
    teacher_store = layout.store(gp.teacher) if gp.teacher is not None else None
    teacher_sha = None
    if teacher_store is not None:
        teacher_sha = LogitStore.open(teacher_store, fingerprint=data.fingerprint).attrs["checkpoint_sha256"]
    meta = checkpoint_meta(data, recipe, gen, gp, teacher_sha)
    key = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()
    state = layout.train_state(gen)
    if not resume:
        state.unlink(missing_ok=True)
    ctx = worker_context(params)
    result = train_generation(data, recipe, gen, gp, teacher_store, state_path=state, state_key=key, ctx=ctx)
    if not ctx.is_main:  # rank 0 alone writes the generation's outputs
        barrier(ctx)
        return {"generation": gen, "rank": ctx.rank}
    save_generation(layout.model(gen), result, meta)
    device = resolve_device(recipe.device, ctx)
    last = result.history[-1]
    metrics = {
        "generation": gen,
        "teacher": gp.teacher,
        "loss": gp.loss,
        "selected_epoch": result.selected_epoch,
        "final_train_loss": last.train_loss,
        "final_val_acc": last.val_acc,
        # Reported only; nothing is selected on it.
        "test_acc": accuracy(predict_logits(result.model, data.x_test, recipe.eval_batch_size, device), data.y_test),
    }
    write_json(layout.train_metrics(gen), metrics)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(asdict(result.history[0])))
    writer.writeheader()
    writer.writerows(asdict(h) for h in result.history)
    write_text(layout.train_plot(gen), buf.getvalue())
    state.unlink(missing_ok=True)  # the stage's outputs are complete: nothing left to resume
    barrier(ctx)
    return metrics
