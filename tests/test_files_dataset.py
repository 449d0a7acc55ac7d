"""Image datasets kept on disk (`data.storage: files`, pipeline/data/files.py): the index prepare writes,
the checked reads, the evaluation and RandomResizedCrop views, and training/export on them."""

from __future__ import annotations

import hashlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.api import prepare_data
from pipeline.core.errors import DatasetError, ParamsError
from pipeline.data.files import DataFileError, FilesDataset, ImageFiles, box_view, decode, draw_box, eval_view
from pipeline.data.prepared import load_prepared
from pipeline.params import DataParams, TrainParams

CLASSES = ("cat", "dog", "owl")


def make_folder(root: Path, per_class: dict[str, int], seed: int = 0) -> list[Path]:
    """An ImageFolder tree of JPEG and PNG files of mixed sizes, each image a class-coloured gradient."""
    rng = np.random.default_rng(seed)
    made = []
    for split, n in per_class.items():
        for k, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = int(rng.integers(20, 48)), int(rng.integers(20, 48))
                a = (rng.random((h, w, 3)) * 60).astype(np.uint8)
                a[..., k] += np.linspace(60, 190, w, dtype=np.uint8)[None, :]
                path = folder / f"{i:03d}.{'jpg' if i % 2 == 0 else 'png'}"
                Image.fromarray(a).save(path, quality=92) if path.suffix == ".jpg" else Image.fromarray(a).save(path)
                made.append(path)
    return made


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    make_folder(tmp_path / "imgs", {"train": 6, "test": 3})
    return tmp_path / "imgs"


def files_params(root: Path, **kw: object) -> DataParams:
    return DataParams(dataset="imagefolder", root=str(root), storage="files", size=16, **kw)  # type: ignore[arg-type]


def test_prepare_writes_an_index_and_no_pixels(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "dataset.h5"
    data = prepare_data(out, params=files_params(folder))
    with h5py.File(out) as f:
        arrays = {k: f[k] for k in f}
        assert not any(k.startswith("x_") for k in arrays)
        assert all(a.dtype != np.uint8 for a in arrays.values())  # no image array of any name
        paths = [p.decode() for p in f["files_train"][()]]
        assert paths[0] == "train/cat/000.jpg" and len(paths) == 18
        first = (folder / paths[0]).read_bytes()
        assert f["sha256_train"][0].decode() == hashlib.sha256(first).hexdigest()
        assert f["bytes_train"][0] == len(first)
        assert f.attrs["storage"] == "files"
    assert out.stat().st_size < 64 * 1024  # an index: a few KiB
    assert isinstance(data.x_train, ImageFiles) and data.x_train.shape == (18, 3, 16, 16)
    assert data.y_train.tolist() == [0] * 6 + [1] * 6 + [2] * 6 and data.class_names == list(CLASSES)
    assert len(data.val_index) == 2  # val_fraction 0.1 of 18
    # the evaluation view of a row is its file decoded, resized (shorter side 18 = 16 / 0.875) and centre-cropped
    img = decode(first, "x")
    np.testing.assert_array_equal(data.x_train[0:1][0], eval_view(img, 16, 18).numpy())


def test_fingerprint_follows_the_index_and_subsets_are_balanced(folder: Path, tmp_path: Path) -> None:
    a = prepare_data(tmp_path / "a.h5", params=files_params(folder))
    b = prepare_data(tmp_path / "b.h5", params=files_params(folder))
    assert a.fingerprint == b.fingerprint
    sub = prepare_data(tmp_path / "c.h5", params=files_params(folder, n_train=6, n_test=3))
    assert sub.fingerprint != a.fingerprint and np.bincount(sub.y_train).tolist() == [2, 2, 2]
    assert sub.source_index is not None and len(sub.source_index["train"]) == 6
    (folder / "train" / "cat" / "000.jpg").write_bytes((folder / "train" / "cat" / "002.jpg").read_bytes())
    changed = prepare_data(tmp_path / "d.h5", params=files_params(folder))
    assert changed.fingerprint != a.fingerprint


def test_list_files_layout(folder: Path, tmp_path: Path) -> None:
    lines = {"train": ["train/cat/000.jpg cat", "train/dog/001.png dog"], "test": ["test/dog/000.jpg dog"]}
    for split, rows in lines.items():
        (folder / f"{split}.txt").write_text("\n".join(rows) + "\n")
    (folder / "listed").mkdir()
    for name in ("train", "test", "train.txt", "test.txt"):
        (folder / name).rename(folder / "listed" / name)
    data = prepare_data(tmp_path / "l.h5", params=files_params(folder / "listed", val_fraction=0.0))
    assert data.class_names == ["cat", "dog"] and data.y_train.tolist() == [0, 1]
    (folder / "listed" / "test.txt").write_text("test/owl/000.jpg owl\n")
    with pytest.raises(DatasetError, match="test.txt: classes \\['owl'\\] do not occur in"):
        prepare_data(tmp_path / "m.h5", params=files_params(folder / "listed"))


def test_changed_missing_and_truncated_files_name_the_file(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "dataset.h5"
    prepare_data(out, params=files_params(folder))
    jpg = folder / "train" / "dog" / "002.jpg"
    blob = jpg.read_bytes()
    # a truncated JPEG: refused when read, by name, in one line
    jpg.write_bytes(blob[: len(blob) // 2])
    prepare_data(out, params=files_params(folder))  # indexed as it is now: its read fails
    data = load_prepared(out)
    with pytest.raises(DataFileError, match=f"^{jpg}: unreadable image") as e:
        data.x_train[:]
    assert "\n" not in str(e.value)
    jpg.write_bytes(blob)
    # a file edited after prepare: at the same size caught when read (sha256), else when opened (size)
    prepare_data(out, params=files_params(folder))
    edited = bytearray(blob)
    edited[-3] ^= 0xFF
    jpg.write_bytes(bytes(edited))
    data = load_prepared(out)  # same size: the open's stat passes
    with pytest.raises(DataFileError, match=f"^{jpg}: changed since `bancache prepare` \\(its sha256"):
        data.x_train[:]
    jpg.write_bytes(blob + b"\0")
    with pytest.raises(DataFileError, match=f"^{jpg}: changed since `bancache prepare` \\({len(blob) + 1} bytes"):
        load_prepared(out)
    jpg.unlink()
    with pytest.raises(DataFileError, match=f"^{jpg}: missing"):
        load_prepared(out)


def test_worker_errors_stay_one_line(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "dataset.h5"
    data = prepare_data(out, params=files_params(folder))
    missing = folder / "train" / "owl" / "004.jpg"
    missing.unlink()
    ds = FilesDataset(data.x_train, data.y_train, np.arange(18))  # type: ignore[arg-type]
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1)
    with pytest.raises(DataFileError) as e:
        list(loader)
    assert str(e.value).startswith(f"{missing}: missing") and "\n" not in str(e.value)


def test_box_draws_follow_random_resized_crop() -> None:
    g = torch.Generator().manual_seed(3)
    for _ in range(200):
        i, j, h, w = draw_box(30, 44, (0.08, 1.0), (0.75, 4 / 3), g)
        assert 0 <= i and 0 <= j and 0 < h and 0 < w and i + h <= 30 and j + w <= 44
        assert 0.08 * 30 * 44 * 0.8 <= h * w <= 30 * 44
    assert draw_box(10, 100, (0.99, 1.0), (1.0, 1.0), torch.Generator().manual_seed(0)) == (0, 45, 10, 10)
    img = torch.arange(3 * 30 * 44, dtype=torch.int64).reshape(3, 30, 44).remainder(251).to(torch.uint8)
    full = box_view(img, (0, 0, 30, 44), True, 44)  # a whole-image box at its own width: only the flip
    assert full.shape == (3, 44, 44)
    np.testing.assert_array_equal(box_view(img, (2, 3, 10, 10), False, 10).numpy(), img[:, 2:12, 3:13].numpy())
    np.testing.assert_array_equal(box_view(img, (2, 3, 10, 10), True, 10).numpy(), img[:, 2:12, 3:13].flip(-1).numpy())


def test_params_of_files_storage_are_checked(folder: Path) -> None:
    with pytest.raises(ParamsError, match="data.storage = 'files': only dataset 'imagefolder'"):
        DataParams(dataset="npz", root="x", storage="files")
    with pytest.raises(ParamsError, match="data.eval_resize = 8: must be >= size"):
        files_params(folder, eval_resize=8)
    assert files_params(folder).eval_side == 18
    with pytest.raises(ParamsError, match="train.crop_scale"):
        TrainParams(crop_scale=(0.5, 0.2))
    with pytest.raises(ParamsError, match="train.crop_ratio = \\[1, 2, 3\\]: expected a list of 2 values"):
        TrainParams(crop_ratio=[1, 2, 3])  # type: ignore[arg-type]
    assert TrainParams(crop_ratio=[1, 2]).crop_ratio == (1.0, 2.0)  # type: ignore[arg-type]


def _recipe(**kw: object) -> TrainParams:
    base: dict[str, object] = {"arch": "cnn3", "epochs": 2, "batch_size": 8, "lr": 0.01, "crop": "resized"}
    return TrainParams(**{**base, **kw})  # type: ignore[arg-type]


def test_train_export_and_replay_resized_crop_views(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.teachers.export as export
    from pipeline.api import export_store, open_targets, train_model
    from pipeline.models.checkpoint import load_checkpoint
    from pipeline.params import ExportParams, GenParams

    data = prepare_data(tmp_path / "dataset.h5", params=files_params(folder))
    train_model(data, gen=0, recipe=_recipe(num_workers=1), out=tmp_path / "gen0.pt")
    meta = load_checkpoint(tmp_path / "gen0.pt")["meta"]
    assert meta["recipe"]["crop"] == "resized" and list(meta["recipe"]["crop_scale"]) == [0.08, 1.0]
    seen: list[np.ndarray] = []  # every input the teacher's export ran on, in order: per chunk, per view
    real = export.predict_logits
    monkeypatch.setattr(export, "predict_logits", lambda m, x, *a: seen.append(np.array(x)) or real(m, x, *a))
    attrs = export_store(
        tmp_path / "gen0.pt", data, tmp_path / "store", params=ExportParams(views=3, chunk_rows=5, num_workers=1)
    )
    aug = attrs["augmentation"]
    assert aug["kind"] == "resized-crop+flip" and aug["size"] == 16 and attrs["input"]["eval_resize"] == 18
    targets = open_targets(tmp_path / "store", "train", data=data)
    files = data.x_train
    assert isinstance(files, ImageFiles)
    for k, start in enumerate(range(0, 18, 5)):
        rows = np.arange(start, min(start + 5, 18))
        for view in (0, 1, 2):
            boxes = targets.boxes(rows, np.full(len(rows), view))
            if view == 0:
                assert not boxes.any()  # the evaluation view
                rebuilt = data.x_train[start : start + len(rows)]
            else:
                assert (boxes[:, 2:4] > 0).all() and len({tuple(b) for b in boxes}) == len(rows)
                rebuilt = np.stack(
                    [box_view(files.image(r), b[:4], bool(b[4]), 16).numpy() for r, b in zip(rows, boxes, strict=True)]
                )
            np.testing.assert_array_equal(rebuilt, seen[3 * k + view])  # bit for bit the teacher's input
    # the student's loader cuts each row's picked view from the same box the store holds
    from pipeline.train.epochs import ViewPolicy, pick_views
    from pipeline.train.inputs import _fit_dataset

    policy = ViewPolicy("random", 3, 5)
    ds = _fit_dataset(data, _recipe(), targets, policy, 5)
    assert isinstance(ds, FilesDataset)
    ds.set_epoch(4)
    picked = set()
    for i in range(len(ds)):
        x, _, row = ds[i]
        view = int(pick_views(policy, 4, np.array([row]))[0])
        picked.add(view)
        b = targets.boxes(np.array([row]), np.array([view]))[0]
        want = data.x_train[row : row + 1][0] if view == 0 else box_view(files.image(row), b[:4], bool(b[4]), 16)
        np.testing.assert_array_equal(x.numpy(), np.asarray(want))
    assert picked == {0, 1, 2}
    # a student on the stored views (view_policy random) trains from them
    student = GenParams(loss="ban", teacher=0, view_policy="random")
    result = train_model(data, gen=1, recipe=_recipe(), generation=student, teacher_store=tmp_path / "store")
    assert len(result.history) == 2
