"""Benchmark: bytes per sample of each way to store a teacher's outputs, for C = 10, 100 and 1000 classes.

Layouts (per sample, per view):
  dense float32 / float16   all C raw logits (what bancache stores; float16 by default)
  top-k (k = 1, 5, 10)      the k largest logits as float16 + their class indices as int16 or int32
  sampled (K = 8, 16)       Sparse Logit Sampling style (Anshumann et al. 2025): K classes drawn from the
                            teacher's softmax with replacement, stored as K slots of (class int16, count
                            uint8), unused slots padded; an unbiased estimate of the distribution
  V views (V = 1, 4, 16)    dense float16 and top-5 for V augmented views of every sample (FKD-style replay)

"raw" is the uncompressed size; "on disk" is measured: the layout's arrays are written with zarr's default
codecs (those LogitStore.create uses: zstd), chunks of 1024 rows, and the chunk files' bytes (metadata
excluded) are divided by the number of samples. Logits are synthetic and teacher-like (benchmarks/_benchlib.
teacher_like_logits: Gaussian dark knowledge + one confident class, ~90% accuracy); --store adds a real
store's train split (e.g. cache/gen-0) as another row. Also reported: probability mass the top-k keeps and
the sampled layout covers (at T = 1), the bias REFERENCE.md asks to report.

    .venv/bin/python benchmarks/storage.py
    .venv/bin/python benchmarks/storage.py --store cache/gen-0
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from _benchlib import machine_info, pick_workdir, table, teacher_like_logits, write_results

from pipeline.audit.statistics import log_softmax
from pipeline.cache.store import LogitStore, iter_blocks

CHUNK_ROWS = 1024


def on_disk(root: Path, name: str, arrays: dict[str, np.ndarray]) -> int:
    """Bytes of chunk files after writing `arrays` with zarr's default codecs (chunks of CHUNK_ROWS rows)."""
    path = root / name
    group = zarr.create_group(str(path), overwrite=True)
    for key, a in arrays.items():
        arr = group.create_array(key, shape=a.shape, chunks=(min(CHUNK_ROWS, len(a)), *a.shape[1:]), dtype=a.dtype)
        arr[...] = a
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name != "zarr.json")
    shutil.rmtree(path)
    return size


def topk(logits: np.ndarray, k: int, index_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(values float16, indices) of the k largest logits along the last axis, largest first."""
    idx = np.argpartition(-logits, k - 1, axis=-1)[..., :k]
    vals = np.take_along_axis(logits, idx, axis=-1)
    order = np.argsort(-vals, axis=-1)
    vals, idx = np.take_along_axis(vals, order, -1), np.take_along_axis(idx, order, -1)
    return vals.astype(np.float16), idx.astype(index_dtype)


def sampled(p: np.ndarray, draws: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: `draws` classes drawn from p with replacement, as (classes int16 padded with -1, counts
    uint8 padded with 0, mass of the distinct classes drawn)."""
    n, c = p.shape
    cdf = np.cumsum(p, axis=1)
    u = rng.random((n, draws))
    picks = np.minimum((cdf[:, None, :] < u[:, :, None]).sum(-1), c - 1)  # inverse-CDF sampling
    picks.sort(axis=1)
    first = np.ones_like(picks, dtype=bool)
    first[:, 1:] = picks[:, 1:] != picks[:, :-1]
    classes = np.full((n, draws), -1, np.int16)
    counts = np.zeros((n, draws), np.uint8)
    mass = np.zeros(n)
    for r in range(n):  # n is a few thousand rows: plain loop is clear and fast enough
        u_cls, cnt = np.unique(picks[r], return_counts=True)
        classes[r, : len(u_cls)], counts[r, : len(u_cls)] = u_cls, cnt
        mass[r] = p[r, u_cls].sum()
    return classes, counts, mass


def measure(root: Path, logits_v: np.ndarray, label: str, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Rows of the result table for logits of shape (N, V, C): every layout for view 0, views for V > 1."""
    n, v_all, c = logits_v.shape
    z = logits_v[:, 0, :]
    p = np.exp(log_softmax(z))
    out: list[dict[str, Any]] = []

    def add(layout: str, raw: float, arrays: dict[str, np.ndarray], views: int = 1, **extra: Any) -> None:
        out.append(
            {
                "source": label,
                "classes": c,
                "layout": layout,
                "views": views,
                "raw_bytes": raw,
                "on_disk_bytes": on_disk(root, layout.replace(" ", "_"), arrays) / n,
                **extra,
            }
        )

    add("dense float32", 4 * c, {"l": z.astype(np.float32)[:, None]})
    add("dense float16", 2 * c, {"l": z.astype(np.float16)[:, None]})
    for k in (1, 5, 10):
        if k >= c:
            continue
        for idt, ib in (("int16", 2), ("int32", 4)):
            vals, idx = topk(z, k, idt)
            kept = float(np.take_along_axis(p, idx.astype(np.int64), -1).sum(-1).mean())
            add(f"top-{k} f16+{idt}", k * (2 + ib), {"v": vals, "i": idx}, mass_kept=kept)
    for draws in (8, 16):
        cls, cnt, mass = sampled(p, draws, rng)
        add(
            f"sampled K={draws} (i16+u8)",
            draws * 3,
            {"i": cls, "n": cnt},
            mass_covered=float(mass.mean()),
            distinct_classes=float((cnt > 0).sum(1).mean()),
        )
    for views in (1, 4, 16):
        if views > v_all:
            continue
        lv = logits_v[:, :views, :]
        add(f"dense float16 x{views} views", 2 * c * views, {"l": lv.astype(np.float16)}, views=views)
        if 5 < c:
            vals, idx = topk(lv, 5, "int16")
            add(f"top-5 f16+int16 x{views} views", 5 * 4 * views, {"v": vals, "i": idx}, views=views)
    return out


def synthetic(n: int, c: int, views: int, rng: np.random.Generator) -> np.ndarray:
    """(n, views, c): one teacher-like logit vector per sample, each view perturbed (augmentation) by N(0, 0.5)."""
    base = teacher_like_logits(rng, n, c)
    return (base[:, None, :] + rng.normal(0, 0.5, (n, views, c))).astype(np.float32)


def from_store(path: Path, max_rows: int) -> np.ndarray:
    store = LogitStore.open(path)
    blocks, got = [], 0
    for _, block in iter_blocks(store.array("train")):
        blocks.append(np.asarray(block, dtype=np.float32))
        got += len(block)
        if got >= max_rows:
            break
    return np.concatenate(blocks)[:max_rows]


def report(rows: list[dict[str, Any]]) -> str:
    """Table 1: bytes per sample, "raw / on disk", one column per (source, C). Table 2: probability mass."""
    cols = list(dict.fromkeys((r["source"], r["classes"]) for r in rows))
    widest = max(cols, key=lambda sc: sum(1 for r in rows if (r["source"], r["classes"]) == sc))
    layouts = [r["layout"] for r in rows if (r["source"], r["classes"]) == widest]
    layouts += [r["layout"] for r in rows if r["layout"] not in layouts]
    layouts = list(dict.fromkeys(layouts))
    cell = {(r["layout"], r["source"], r["classes"]): r for r in rows}
    heads = ["layout"] + [f"C={c}" if s == "synthetic" else f"C={c} ({s})" for s, c in cols]

    def fmt(r: dict[str, Any] | None) -> str:
        return f"{r['raw_bytes']:,.0f} / {r['on_disk_bytes']:,.1f}" if r else "-"

    t1 = table(heads, [[lay] + [fmt(cell.get((lay, s, c))) for s, c in cols] for lay in layouts])
    mass_rows = []
    for lay in layouts:
        ms = [cell.get((lay, s, c), {}) for s, c in cols]
        vals = [m.get("mass_kept", m.get("mass_covered")) for m in ms]
        if any(v is not None for v in vals):
            mass_rows.append([lay] + [f"{v:.3f}" if v is not None else "-" for v in vals])
    t2 = table(heads, mass_rows)
    return (
        f"Bytes per sample, raw / on disk (zarr default codecs):\n\n{t1}\n\n"
        f"Mean teacher probability mass (T = 1) that top-k keeps / that the sampled classes cover:\n\n{t2}\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4096, help="samples per measurement (4 chunks)")
    ap.add_argument("--classes", default="10,100,1000")
    ap.add_argument("--store", default=None, help="also measure this logit store's train split")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    info = machine_info()
    root = pick_workdir(args.workdir, 2**30, "bancache-storage-")
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    for c in [int(x) for x in args.classes.split(",")]:
        print(f"[storage] C={c} ...", flush=True)
        rows += measure(root, synthetic(args.rows, c, 16, rng), "synthetic", rng)
    if args.store:
        real = from_store(Path(args.store), args.rows)
        print(f"[storage] {args.store}: {real.shape} ...", flush=True)
        rows += measure(root, real, f"store {args.store}", rng)
    shutil.rmtree(root, ignore_errors=True)
    text = report(rows)
    print(
        f"\nstorage: bytes per sample, {args.rows} samples per measurement, zarr {info['zarr']} default codecs, "
        f"{info['date_utc']}\n\n{text}"
    )
    path = write_results(
        "storage", {"benchmark": "storage", "machine": info, "args": vars(args), "rows": rows, "table_markdown": text}
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
