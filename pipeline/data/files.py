"""Image datasets kept on disk (`data.storage: files`): an index of the files, checked reads, one decode
and the crop + resize views every stage takes.

`prepare` writes only the index into data/dataset.h5 (`write_index`): per split the files' paths relative
to the root, labels, byte sizes and sha256, hashed in parallel threads; the fingerprint is derived from it.
No pixel is copied. Layouts (`scan`): an ImageFolder tree `root/train/<class>/*` with `root/test/<class>/*`
(or `root/val/...`), or list files `root/train.txt` and `root/test.txt` (or `val.txt`) of lines
`<path relative to root> <class name>` (used when present, whatever folders lie beside them).

Checks (`DataFileError`, one line naming the file): opening the dataset (`ImageFiles.check_sizes`, under
`load_prepared(verify=True)`) stats every file and refuses a missing one or one whose size changed; every
read hashes the bytes it read (sha256, cheap beside the decode) and refuses a file whose content changed
at the same size, and a file that does not decode (a truncated JPEG) is refused by name too.

Pixels: `decode` (torchvision.io.decode_image to RGB uint8 CHW: about 1.7x faster than PIL for 128 px
JPEG on this CPU, 0.50 ms against 0.86 ms), then either the evaluation view (`eval_view`: shorter side
resized to `eval_resize`, centre crop `size`) or a box `(i, j, h, w)` of the decoded image resized to
`size` x `size` and flipped (`box_view`, RandomResizedCrop's operation). Both resize bilinearly with
antialias on uint8 tensors, in one code path, so a box replayed later gives the same pixels bit for bit.
Boxes are drawn by `draw_box` from a generator (RandomResizedCrop's algorithm), seeded per (row, view) or
per (epoch, row) with `mix64`, so a worker, a process or a later student draws the same box.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.core.errors import DatasetError
from pipeline.data.seeds import mix64

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
TEST_NAMES = ("test", "val")  # the held-out split's folder or list file, the first one present
# Normalisation of on-disk datasets: the ImageNet statistics (prepare decodes no pixel to measure them)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LIVE_KEY = 1 << 41  # keys live training crops mix64(seed, LIVE_KEY, epoch, row) apart from stored views
EVAL_BOX = (0, 0, 0, 0)  # the stored "box" of view 0: the evaluation view (resize + centre crop), no flip


class DataFileError(DatasetError):
    """A file of an on-disk dataset is missing, changed or unreadable since `prepare`: one line naming it.

    Raised in a DataLoader worker, torch re-raises it in the main process as `DataFileError(text)`, text
    being the worker's whole traceback; the one line is recovered from that text's last line."""

    def __init__(self, message: str) -> None:
        if "Original Traceback" in message:
            last = message.rstrip().splitlines()[-1]
            message = last.split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message)


@dataclass(frozen=True)
class SplitFiles:
    """One split's files: paths relative to the root (posix), int64 labels; sizes and sha256 once hashed."""

    paths: list[str]
    labels: np.ndarray
    sizes: np.ndarray | None = None  # int64 bytes per file
    sha256: list[str] | None = None  # hex digests

    def take(self, rows: np.ndarray) -> SplitFiles:
        sizes = None if self.sizes is None else self.sizes[rows]
        sha = None if self.sha256 is None else [self.sha256[r] for r in rows]
        return SplitFiles([self.paths[r] for r in rows], self.labels[rows], sizes, sha)

    def joined(self, more: SplitFiles, label: int) -> SplitFiles:
        """These files, then `more`'s, every one of `more` given `label` (a transfer set's unlabelled rows)."""
        sizes = None if self.sizes is None or more.sizes is None else np.concatenate([self.sizes, more.sizes])
        sha = None if self.sha256 is None or more.sha256 is None else [*self.sha256, *more.sha256]
        labels = np.concatenate([self.labels, np.full(len(more.labels), label, dtype=np.int64)])
        return SplitFiles([*self.paths, *more.paths], labels, sizes, sha)


def _images_under(folder: Path, root: Path) -> list[str]:
    return sorted(
        p.relative_to(root).as_posix() for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )


def _scan_folders(root: Path, test: str) -> tuple[dict[str, SplitFiles], list[str]]:
    """ImageFolder layout: class names are train's sorted folder names; test may lack some of them."""
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if not classes:
        raise DatasetError(f"{root / 'train'}: no class folders. Put the train images under {root}/train/<class>/")
    extra = sorted(p.name for p in (root / test).iterdir() if p.is_dir() and p.name not in classes)
    if extra:
        raise DatasetError(f"{root / test}: class folders {extra} are not in {root / 'train'}; give both the same")
    out = {}
    for split, folder in (("train", "train"), ("test", test)):
        paths: list[str] = []
        labels: list[int] = []
        for k, name in enumerate(classes):
            found = _images_under(root / folder / name, root) if (root / folder / name).is_dir() else []
            paths += found
            labels += [k] * len(found)
        out[split] = SplitFiles(paths, np.asarray(labels, dtype=np.int64))
    return out, classes


def _read_list(path: Path) -> list[tuple[str, str]]:
    entries = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2:
            raise DatasetError(f"{path}:{n}: expected '<path relative to the root> <class name>', got {line!r}")
        entries.append((parts[0].strip(), parts[1]))
    return entries


def _scan_lists(root: Path, test: str) -> tuple[dict[str, SplitFiles], list[str]]:
    """List layout: class names are the sorted names train.txt uses; test.txt may use only those."""
    lists = {"train": _read_list(root / "train.txt"), "test": _read_list(root / f"{test}.txt")}
    classes = sorted({label for _, label in lists["train"]})
    index = {name: k for k, name in enumerate(classes)}
    unknown = sorted({label for _, label in lists["test"]} - set(classes))
    if unknown:
        raise DatasetError(f"{root / f'{test}.txt'}: classes {unknown[:5]} do not occur in {root / 'train.txt'}")
    out = {
        split: SplitFiles([p for p, _ in entries], np.asarray([index[c] for _, c in entries], dtype=np.int64))
        for split, entries in lists.items()
    }
    return out, classes


def scan(root: str | os.PathLike[str]) -> tuple[dict[str, SplitFiles], list[str]]:
    """The train and test files under `root` and the class names (ImageFolder tree or list files)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: image root not found (no such directory). Point data.root at it")
    if (root / "train.txt").is_file():  # a list names the files explicitly: it wins over folders
        test = next((t for t in TEST_NAMES if (root / f"{t}.txt").is_file()), None)
        if test is None:
            raise DatasetError(f"{root}: train.txt but no test.txt or val.txt list beside it")
        return _scan_lists(root, test)
    if (root / "train").is_dir():
        test = next((t for t in TEST_NAMES if (root / t).is_dir()), None)
        if test is None:
            raise DatasetError(f"{root}: no test/ or val/ beside train/. Put held-out images in {root}/test/<class>/")
        return _scan_folders(root, test)
    raise DatasetError(
        f"{root}: neither train/<class>/ folders nor a train.txt list. Lay the images out as "
        f"{root}/train/<class>/* and {root}/test/<class>/*, or list them in train.txt and test.txt"
    )


def _digest(path: Path) -> tuple[int, str]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataFileError(f"{path}: cannot be read ({e.strerror or e}); restore it or remove it from the data") from e
    return len(data), hashlib.sha256(data).hexdigest()


def hash_files(
    root: Path, files: SplitFiles, workers: int = 8, on_files: Callable[[int], None] | None = None
) -> SplitFiles:
    """`files` with each file's byte size and sha256, hashed by `workers` threads (hashlib and file reads
    release the GIL); `on_files(1)` after each file, in order (progress)."""
    sizes, digests = [], []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for size, digest in pool.map(_digest, (root / p for p in files.paths)):
            sizes.append(size)
            digests.append(digest)
            if on_files is not None:
                on_files(1)
    return SplitFiles(files.paths, files.labels, np.asarray(sizes, dtype=np.int64), digests)


def index_fingerprint(
    splits: dict[str, SplitFiles], class_names: list[str], val_index: np.ndarray, recipe: dict[str, Any]
) -> str:
    """sha256 over the recipe (size, eval_resize), the class names, each split's paths, labels, sizes and
    hashes, and the validation rows: what the index says, not where the root lies."""
    h = hashlib.sha256()
    h.update(f"files;{sorted(recipe.items())};{class_names}".encode())
    for split in sorted(splits):
        s = splits[split]
        assert s.sizes is not None and s.sha256 is not None, "fingerprint of an unhashed index"
        h.update(f"{split}:{len(s.paths)};".encode())
        for path, label, size, digest in zip(s.paths, s.labels.tolist(), s.sizes.tolist(), s.sha256, strict=True):
            h.update(f"{path}\0{label}\0{size}\0{digest}\n".encode())
    h.update(np.ascontiguousarray(val_index, dtype=np.int64).tobytes())
    return h.hexdigest()


def decode(data: bytes, name: str) -> torch.Tensor:
    """RGB uint8 (3, H, W) of an encoded image; a file that does not decode is refused by `name`."""
    from torchvision.io import ImageReadMode, decode_image

    try:
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        reason = re.sub(r"^[^,]*, \S+:\d+, ", "", first)[:120]  # without torchvision's "decode_jpeg, <source>:171, "
        raise DataFileError(
            f"{name}: unreadable image (truncated or not an image: {reason}); replace the file and rerun "
            "`bancache prepare`, or remove it from the dataset"
        ) from e


def eval_view(img: torch.Tensor, size: int, eval_resize: int) -> torch.Tensor:
    """The evaluation/export view: shorter side resized to `eval_resize` (bilinear, antialias), centre crop."""
    from torchvision.transforms.v2 import functional as F

    resized = F.resize(img, [eval_resize], antialias=True)
    return F.center_crop(resized, [size, size]).contiguous()


def box_view(img: torch.Tensor, box: Sequence[int], flip: bool, size: int) -> torch.Tensor:
    """Box (i, j, h, w) of `img` resized to size x size (bilinear, antialias), columns reversed if `flip`."""
    from torchvision.transforms.v2 import functional as F

    i, j, h, w = (int(v) for v in box)
    out = F.resized_crop(img, i, j, h, w, [size, size], antialias=True)
    return (out.flip(-1) if flip else out).contiguous()


def draw_box(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], g: torch.Generator
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (i, j, h, w) of an image of height x width, drawn from `g`: up to 10 tries of
    an area fraction in `scale` and a log-uniform aspect ratio in `ratio`, else the centre crop of the
    image clamped to `ratio`. Float math in Python (float64), so every platform draws the same box."""
    area = height * width
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u = torch.rand(2, generator=g, dtype=torch.float64).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(lo + (hi - lo) * u[1])
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(torch.randint(0, height - h + 1, (1,), generator=g).item())
            j = int(torch.randint(0, width - w + 1, (1,), generator=g).item())
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def seeded_box(
    keys: tuple[int, ...], height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[tuple[int, int, int, int], bool]:
    """The box and flip of the generator seeded with mix64(*keys): `draw_box`, then one flip draw."""
    g = torch.Generator().manual_seed(mix64(*keys))
    box = draw_box(height, width, scale, ratio, g)
    return box, bool(torch.rand(1, generator=g).item() < 0.5)


@dataclass(frozen=True)
class CropRecipe:
    """RandomResizedCrop + flip at `size`: the area fraction `scale` and aspect `ratio` ranges."""

    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float]


class ImageFiles:
    """One split's images on disk, sliced like a uint8 (N, 3, size, size) array of evaluation views:
    `files[a:b]` decodes rows a..b-1 (in `workers` threads) into a numpy array; `files[rows]` (an integer
    array) is the lazy subset of those rows. Holds the index only, whatever the number of files."""

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(
        self, root: Path, files: SplitFiles, size: int, eval_resize: int, workers: int = 1, rows: Any = None
    ) -> None:
        assert files.sizes is not None and files.sha256 is not None, "ImageFiles needs a hashed index"
        self.root, self.files, self.size, self.eval_resize, self.workers = root, files, size, eval_resize, workers
        self.rows = np.arange(len(files.paths)) if rows is None else np.asarray(rows, dtype=np.int64)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.rows), 3, self.size, self.size)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            rows = self.rows[key].tolist()
            if not rows:
                return np.zeros((0, 3, self.size, self.size), np.uint8)
            if self.workers > 1 and len(rows) > 1:
                with ThreadPoolExecutor(self.workers) as pool:  # decode and resize release the GIL
                    views = list(pool.map(self.eval_image, rows))
            else:
                views = [self.eval_image(r) for r in rows]
            return torch.stack(views).numpy()
        if isinstance(key, int | np.integer):
            return self.eval_image(int(self.rows[key])).numpy()
        return ImageFiles(self.root, self.files, self.size, self.eval_resize, self.workers, self.rows[np.asarray(key)])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def path(self, row: int) -> Path:
        return self.root / self.files.paths[row]

    def check_sizes(self) -> None:
        """Stat every file of the index (not its content): a missing file or another size is refused."""
        sizes = self.files.sizes
        assert sizes is not None
        for row, rel in enumerate(self.files.paths):
            try:
                size = os.stat(self.root / rel).st_size
            except OSError:
                raise DataFileError(
                    f"{self.root / rel}: missing (listed by `bancache prepare`); restore it, or rerun "
                    "`bancache prepare` to index the files as they are now"
                ) from None
            if size != sizes[row]:
                raise DataFileError(
                    f"{self.root / rel}: changed since `bancache prepare` ({size} bytes, {sizes[row]} indexed); "
                    "restore it, or rerun `bancache prepare` (and the stages after it)"
                )

    def image(self, row: int) -> torch.Tensor:
        """The decoded RGB uint8 (3, H, W) of file `row` (a row of the whole split, not of this subset),
        after checking its bytes against the index."""
        path = self.path(row)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise DataFileError(
                f"{path}: missing (listed by `bancache prepare`); restore it, or rerun `bancache prepare`"
            ) from None
        except OSError as e:
            raise DataFileError(f"{path}: cannot be read ({e.strerror or e}); check its permissions") from e
        assert self.files.sha256 is not None
        if hashlib.sha256(data).hexdigest() != self.files.sha256[row]:
            raise DataFileError(
                f"{path}: changed since `bancache prepare` (its sha256 differs from the index); restore it, "
                "or rerun `bancache prepare` (and the stages after it)"
            )
        return decode(data, str(path))

    def eval_image(self, row: int) -> torch.Tensor:
        return eval_view(self.image(row), self.size, self.eval_resize)


class FilesDataset(Dataset):
    """(x, y, index) of rows of an `ImageFiles` split, decoded in the DataLoader's workers: the evaluation
    view; with `crop` a RandomResizedCrop + flip seeded mix64(seed, LIVE_KEY, epoch, row) (`set_epoch`
    before each epoch's iteration, workers being started per epoch); with `views`, a function (epoch, rows)
    -> each row's stored view, and `view_keys` (export seed, split id), the stored view's very box."""

    def __init__(
        self,
        files: ImageFiles,
        y: np.ndarray,
        rows: np.ndarray,
        crop: CropRecipe | None = None,
        seed: int = 0,
        views: Callable[[int, np.ndarray], np.ndarray] | None = None,
        view_keys: tuple[int, int] = (0, 0),
    ) -> None:
        self.files, self.y, self.rows = files, torch.from_numpy(np.ascontiguousarray(y)), np.asarray(rows)
        self.crop, self.seed, self.views, self.view_keys = crop, seed, views, view_keys
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        row = int(self.rows[i])
        file_row = int(self.files.rows[row])
        img = self.files.image(file_row)
        crop, keys = self.crop, (self.seed, LIVE_KEY, self.epoch, row)
        if self.views is not None:
            view = int(self.views(self.epoch, np.array([row]))[0])
            keys = (*self.view_keys, row, view)
            crop = crop if view > 0 else None
        if crop is None:
            x = eval_view(img, self.files.size, self.files.eval_resize)
        else:
            box, flip = seeded_box(keys, int(img.shape[1]), int(img.shape[2]), crop.scale, crop.ratio)
            x = box_view(img, box, flip, crop.size)
        return x, self.y[row], row


@dataclass(frozen=True)
class BoxRecipe:
    """Stored RandomResizedCrop views: `crop`, and the keys (export seed, split id) of their seeds."""

    crop: CropRecipe
    seed: int
    split_id: int


class RowViews(Dataset):
    """Item b: (boxes (V, 5) int64 (i, j, h, w, flip), views uint8 (V, 3, S, S)) of row `rows[b]`, file
    `files.rows[b]`: view 0 the evaluation view (box 0, 0, 0, 0, 0), view v >= 1 the box drawn for
    (seed, split id, row, v). Each file is read and decoded once for all its views."""

    def __init__(self, files: ImageFiles, rows: np.ndarray, views: int, recipe: BoxRecipe | None) -> None:
        self.files, self.rows, self.views, self.recipe = files, np.asarray(rows), views, recipe

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.files.image(int(self.files.rows[b]))
        boxes = torch.zeros((self.views, 5), dtype=torch.int64)
        out = [eval_view(img, self.files.size, self.files.eval_resize)]
        for view in range(1, self.views):
            assert self.recipe is not None, "views beyond 0 need a box recipe"
            r, height, width = self.recipe, int(img.shape[1]), int(img.shape[2])
            keys = (r.seed, r.split_id, int(self.rows[b]), view)
            box, flip = seeded_box(keys, height, width, r.crop.scale, r.crop.ratio)
            boxes[view] = torch.tensor([*box, int(flip)])
            out.append(box_view(img, box, flip, r.crop.size))
        return boxes, torch.stack(out)


def chunk_views(
    files: ImageFiles, rows: np.ndarray, views: int, recipe: BoxRecipe | None, workers: int = 0
) -> tuple[np.ndarray, list[np.ndarray]]:
    """`RowViews` of a chunk's rows gathered in row order: (B, V, 5) boxes and V arrays (B, 3, S, S);
    decoded in `workers` DataLoader worker processes (0: in this process)."""
    loader = torch.utils.data.DataLoader(RowViews(files, rows, views, recipe), batch_size=None, num_workers=workers)
    items = list(loader)
    size = files.size if recipe is None else recipe.crop.size
    if not items:
        return np.zeros((0, views, 5), np.int64), [np.zeros((0, 3, size, size), np.uint8)] * views
    boxes = torch.stack([b for b, _ in items]).numpy()
    images = torch.stack([v for _, v in items])  # (B, V, 3, S, S)
    return boxes, [images[:, view].contiguous().numpy() for view in range(views)]
