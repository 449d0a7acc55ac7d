"""Typed, validated params: one frozen dataclass per params.yaml section.

Validation happens on load, before any work starts: an unknown key, a wrong type or an out-of-range value
raises `ParamsError` naming the key, the value and what is allowed. The dataclasses check themselves when
constructed (`__post_init__`), so `TrainParams(lr="fast")` in a script fails there, naming `train.lr`, and
not later inside training; `dataclasses.replace` builds a new object and so checks it too.
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from pipeline.cache.formats import LAYOUTS
from pipeline.core.errors import ParamsError
from pipeline.losses import LOSSES, label_losses, loss_spec, teacher_losses

DATASETS = ("mnist1d", "cifar10", "cifar100", "npz", "imagefolder")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "constant", "step", "onecycle")
SELECTIONS = ("last", "best_val")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float16", "float32")
VIEW_POLICIES = ("clean", "cycle", "random")
STORAGES = ("memory", "files")
CROPS = ("pad", "resized")

SOURCE_KINDS = ("torchvision", "factory", "torchscript", "export")  # gen0.source.kind: teachers from elsewhere
ENSEMBLE_MODES = ("probs", "logits")  # an ensemble teacher's target: mean of the members' p_T, or of their logits

T = TypeVar("T")
SCALAR = int | float | str | bool | None  # the values a mapping param (gen0.source.kwargs) may hold

# The params section being parsed (`students.2`), named in the messages of the object built meanwhile; an
# object constructed directly names its class's SECTION instead.
_SECTION: contextvars.ContextVar[str | None] = contextvars.ContextVar("bancache_params_section", default=None)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict or (isinstance(tp, type) and issubclass(tp, Checked)):
        return "a mapping"
    args = typing.get_args(tp)
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(args[0])}"
    if args:
        return " or ".join(_type_name(a) for a in args)
    return "null" if tp is type(None) else tp.__name__


def _check_type(where: str, value: Any, tp: Any) -> Any:
    """Return `value` coerced to `tp` (int -> float only) or raise ParamsError."""
    origin = typing.get_origin(tp)
    if origin is list:
        if not isinstance(value, list):
            raise ParamsError(f"{where} = {value!r}: expected {_type_name(tp)}")
        (item,) = typing.get_args(tp)
        return [_check_type(where, v, item) for v in value]
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _check_type(where, value, option)
            except ParamsError:
                continue
        raise ParamsError(f"{where} = {value!r}: expected {_type_name(tp)}")
    if origin is tuple and typing.get_args(tp)[-1] is not Ellipsis:  # a fixed-length pair (train.crop_scale)
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ParamsError(f"{where} = {value!r}: expected a list of {len(args)} values ({_type_name(args[0])})")
        return tuple(_check_type(f"{where}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if tp is type(None):
        if value is None:
            return None
    elif tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):  # YAML .nan / .inf: no float param means anything with them
            raise ParamsError(f"{where} = {value!r}: must be a finite number (not NaN or infinity)")
        return float(value)
    elif tp is bool and isinstance(value, bool):
        return value
    elif origin is tuple and isinstance(value, (list, tuple)):  # tuple[float, ...]: a YAML list
        return tuple(_check_type(f"{where}[{i}]", v, typing.get_args(tp)[0]) for i, v in enumerate(value))
    elif origin is dict and isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {k: _check_type(f"{where}.{k}", v, SCALAR) for k, v in value.items()}  # dict[str, scalar]
    elif isinstance(tp, type) and issubclass(tp, Checked):  # a nested section (gen0.source.transform)
        return value if isinstance(value, tp) else parse_section(tp, where, value)
    elif tp in (int, str) and isinstance(value, tp) and not isinstance(value, bool):
        return value
    raise ParamsError(f"{where} = {value!r}: expected {_type_name(tp)}")


def parse_section(cls: type[T], section: str, raw: Any) -> T:
    """Build dataclass `cls` from the mapping `raw` found under params key `section`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ParamsError(f"{section}: expected a mapping of keys to values, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ParamsError(f"{section}.{unknown[0]}: unknown key. Allowed keys in '{section}': {', '.join(names)}")
    values = {k: _check_type(f"{section}.{k}", v, hints[k]) for k, v in raw.items()}  # in the file's order
    token = _SECTION.set(section)
    try:
        return cls(**values)  # __post_init__ checks the whole object once, naming `section`
    finally:
        _SECTION.reset(token)


_FIELD_TYPES: dict[type, dict[str, Any]] = {}


def _field_types(cls: type) -> dict[str, Any]:
    """The resolved type of each field of dataclass `cls` (resolved once per class)."""
    if cls not in _FIELD_TYPES:
        hints = typing.get_type_hints(cls)
        _FIELD_TYPES[cls] = {f.name: hints[f.name] for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return _FIELD_TYPES[cls]


class Checked:
    """Base of the section dataclasses: every field's type (int -> float coerced) and the section's
    `check` run on construction, so no object of an invalid section exists, whoever builds it."""

    SECTION: ClassVar[str] = ""

    def __post_init__(self) -> None:
        section = _SECTION.get() or self.SECTION
        for name, tp in _field_types(type(self)).items():
            object.__setattr__(self, name, _check_type(f"{section}.{name}", getattr(self, name), tp))
        self.check(section)

    def check(self, section: str) -> None:
        """Range and choice checks of the section, messages naming `section`; none by default."""


def _one_of(where: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ParamsError(f"{where} = {value!r}: allowed values are {', '.join(allowed)}")


def _range(where: str, value: float, lo: float, hi: float | None, lo_open: bool = False) -> None:
    too_low = value <= lo if lo_open else value < lo
    if too_low or (hi is not None and value > hi):
        low = f"> {lo}" if lo_open else f">= {lo}"
        allowed = f"{low} and <= {hi}" if hi is not None else low
        raise ParamsError(f"{where} = {value!r}: must be {allowed}")


def _check_arch(where: str, arch: str) -> None:
    import torch

    from pipeline.models.registry import ARCHS, lookup, torchvision_alias

    def hint() -> str:  # only on the error path: it imports torchvision.models
        alias = torchvision_alias(arch)
        return f". For torchvision's {arch}, write {alias!r}" if alias else ""

    found = lookup(arch)
    if found is not None and arch not in ARCHS:
        try:  # parametric names check their depth rule when built; the meta device allocates nothing
            with torch.device("meta"):
                found((3, 32, 32), 10)
        except ValueError as e:
            raise ParamsError(f"{where} = {arch!r}: {e}{hint()}") from None
    if found is None:
        raise ParamsError(
            f"{where} = {arch!r}: unknown architecture{hint()}. Registered: {', '.join(sorted(ARCHS))}; "
            f"parametric: resnet{{d}}, preresnet{{d}}, wrn{{d}}_{{k}}[_drop{{p}}], densenet_bc{{d}}_{{k}}, tv_{{name}}"
        )


@dataclass(frozen=True)
class DataParams(Checked):
    """Section `data`: which dataset `prepare` writes, and the validation split carved from train."""

    SECTION = "data"

    dataset: str = "mnist1d"
    num_samples: int = 5000  # MNIST-1D train + test rows (its default); 80% go to train
    val_fraction: float = 0.1  # of the train rows, held out for checkpoint selection
    split_seed: int = 0
    root: str = ""  # image datasets: torchvision root, npz folder (train.npz, test.npz) or ImageFolder root
    download: bool = False  # cifar10/cifar100: let torchvision download into root (needs internet)
    size: int = 32  # imagefolder: images are resized to size x size
    n_train: int | None = None  # class-balanced seeded subset of train rows (None: all)
    n_test: int | None = None
    # a transfer set: this many of the train rows the n_train subset leaves out, kept without their labels
    # (a teacher exports logits for them, a student learns from those; None: none)
    n_unlabelled: int | None = None
    # memory: pixels copied into data/dataset.h5 and read whole (small datasets); files (imagefolder only):
    # prepare writes an index of the files (paths, labels, sizes, sha256) and every stage decodes them
    storage: str = "memory"
    eval_resize: int | None = None  # files: evaluation/export view = shorter side resized to this, centre crop size

    @property
    def eval_side(self) -> int:
        """The evaluation view's resize (files storage): eval_resize, or size / 0.875 rounded (ImageNet's)."""
        return self.eval_resize if self.eval_resize is not None else int(round(self.size / 0.875))

    def check(self, section: str) -> None:
        _one_of(f"{section}.dataset", self.dataset, DATASETS)
        _one_of(f"{section}.storage", self.storage, STORAGES)
        if self.storage == "files" and self.dataset != "imagefolder":
            raise ParamsError(
                f"{section}.storage = 'files': only dataset 'imagefolder' is kept on disk (got {self.dataset!r}); "
                "set data.storage: memory"
            )
        _range(f"{section}.size", self.size, 1, None)
        if self.eval_resize is not None and self.eval_resize < self.size:
            raise ParamsError(
                f"{section}.eval_resize = {self.eval_resize}: must be >= size ({self.size}), the centre crop's side"
            )
        if self.dataset != "mnist1d" and not self.root:
            raise ParamsError(f"{section}.root: required for dataset {self.dataset!r} (the folder holding its files)")
        _range(f"{section}.num_samples", self.num_samples, 10, None)
        _range(f"{section}.val_fraction", self.val_fraction, 0.0, 0.9)
        if self.n_unlabelled is not None:
            _range(f"{section}.n_unlabelled", self.n_unlabelled, 1, None)
            if self.n_train is None:
                raise ParamsError(
                    f"{section}.n_unlabelled = {self.n_unlabelled}: the unlabelled rows are the train rows a labelled "
                    f"subset leaves out; set {section}.n_train (the labelled rows) too, or n_unlabelled: null"
                )


@dataclass(frozen=True)
class TrainParams(Checked):
    """Section `train`: the recipe every generation shares (the paper gives each student the
    teacher's schedule)."""

    SECTION = "train"

    arch: str = "cnn1d"
    epochs: int = 60
    batch_size: int = 128
    eval_batch_size: int = 1024
    optimizer: str = "adam"
    lr: float = 0.02
    momentum: float = 0.9  # SGD only
    nesterov: bool = False  # SGD only
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_epochs: int = 0  # linear warmup before the schedule (onecycle: its rise, 0 = 30% of the epochs)
    select: str = "last"  # which epoch's weights become the generation: never chosen on test data
    seed: int = 0  # generation K trains with seed + K unless its own section sets `seed`
    device: str = "auto"
    deterministic: bool = True
    # torch intra-op CPU threads in deterministic mode (torch.set_num_threads, whatever OMP_NUM_THREADS
    # says): CPU float sums are split per thread, so the results depend on it. 0 keeps torch's default
    # (not reproducible across machines). 1: cnn1d epochs took 0.6 s against 10 s with 2 on a loaded 2-core box
    threads: int = 1
    num_workers: int = 0
    augment: bool = True  # image datasets only: random crop (pad 4) and horizontal flip
    # pad: crop of the zero-padded stored image (CIFAR); resized (data.storage: files): RandomResizedCrop of
    # the decoded file, area fraction in crop_scale and aspect ratio in crop_ratio, resized to data.size
    crop: str = "pad"
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 4 / 3)
    amp: str = "auto"  # CUDA autocast: auto (bf16 where supported), bf16, fp16, off; CPU always float32
    channels_last: bool = True  # CUDA image models only
    # Train images, labels and the teacher's train targets are held on the training device (GPU memory on
    # CUDA, RAM on CPU) when together they fit this many MiB; beyond it (or 0) batches stream from a
    # DataLoader and the store. ImageNet-1k at 64 px (1.28M x 3 x 64 x 64 uint8) plus fp16 logits: ~17 GiB.
    memory_budget_mib: int = 4096
    compile: bool = False  # torch.compile the training forward/backward (first epoch pays the compilation)

    def check(self, section: str) -> None:
        _check_arch(f"{section}.arch", self.arch)
        _one_of(f"{section}.optimizer", self.optimizer, OPTIMIZERS)
        _one_of(f"{section}.schedule", self.schedule, SCHEDULES)
        _one_of(f"{section}.select", self.select, SELECTIONS)
        _one_of(f"{section}.device", self.device, DEVICES)
        _one_of(f"{section}.amp", self.amp, ("auto", "bf16", "fp16", "off"))
        _one_of(f"{section}.crop", self.crop, CROPS)
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ParamsError(f"{section}.crop_scale = {list(self.crop_scale)}: need 0 < min <= max <= 1")
        lo, hi = self.crop_ratio
        if not 0 < lo <= hi:
            raise ParamsError(f"{section}.crop_ratio = {list(self.crop_ratio)}: need 0 < min <= max")
        _range(f"{section}.epochs", self.epochs, 1, None)
        _range(f"{section}.warmup_epochs", self.warmup_epochs, 0, None)
        if self.warmup_epochs >= self.epochs:
            raise ParamsError(
                f"{section}.warmup_epochs = {self.warmup_epochs}: must be below epochs ({self.epochs}); "
                "the schedule needs epochs after the warmup"
            )
        _range(f"{section}.batch_size", self.batch_size, 1, None)
        _range(f"{section}.eval_batch_size", self.eval_batch_size, 1, None)
        _range(f"{section}.lr", self.lr, 0.0, None, lo_open=True)
        _range(f"{section}.momentum", self.momentum, 0.0, 1.0)
        _range(f"{section}.weight_decay", self.weight_decay, 0.0, None)
        _range(f"{section}.num_workers", self.num_workers, 0, None)
        _range(f"{section}.threads", self.threads, 0, None)
        _range(f"{section}.memory_budget_mib", self.memory_budget_mib, 0, None)


@dataclass(frozen=True)
class GenParams(Checked):
    """Sections `gen0` and `students.K`: what generation K learns from and how."""

    SECTION = "students.K"

    loss: str = "ban"
    # generation whose cached logits are the targets, or a list of earlier generations (an ensemble teacher);
    # None: the generation trains from labels (generation 0, or a label-trained member with loss ce)
    teacher: int | list[int] | None = None
    temperature: float = 1.0  # softening of teacher and student logits for the soft term
    alpha: float = 0.5  # kd: weight of the label term; dkd: weight of TCKD (mdistiller: 1.0); others ignore it
    beta: float = 8.0  # dkd only: weight of NCKD (mdistiller's CIFAR default)
    seed: int | None = None
    arch: str | None = None  # overrides train.arch for this generation
    # Which cached view a sample trains on: clean (view 0 plus live augmentation), cycle (epoch % V) or
    # random (seeded per epoch and sample); cycle and random replay the view's stored crop and flip.
    view_policy: str = "clean"
    # An ensemble teacher's soft target: the mean of the members' softmax at T (probs, Hinton et al.), or the
    # softmax at T of the mean of their logits (logits: dense members only). A single teacher ignores it.
    ensemble: str = "probs"

    @property
    def members(self) -> tuple[int, ...]:
        """The generations whose stores are the targets: one for a single teacher, none for labels."""
        if self.teacher is None:
            return ()
        return tuple(self.teacher) if isinstance(self.teacher, list) else (self.teacher,)

    def check(self, section: str) -> None:
        _one_of(f"{section}.loss", self.loss, tuple(LOSSES))
        _one_of(f"{section}.view_policy", self.view_policy, VIEW_POLICIES)
        _one_of(f"{section}.ensemble", self.ensemble, ENSEMBLE_MODES)
        _range(f"{section}.temperature", self.temperature, 0.0, None, lo_open=True)
        _range(f"{section}.alpha", self.alpha, 0.0, 1.0)
        _range(f"{section}.beta", self.beta, 0.0, None)
        if self.arch is not None:
            _check_arch(f"{section}.arch", self.arch)


@dataclass(frozen=True)
class TransformParams(Checked):
    """Section `gen0.source.transform`: how an imported teacher wants its input, applied to the dataset's
    uint8 images in this order: resize (bilinear, antialiased; the shorter side to `resize`), centre crop to
    `crop` x `crop`, scale to [0, 1], normalise by `mean` and `std` (per channel). Unset steps are skipped."""

    SECTION = "gen0.source.transform"

    resize: int | None = None
    crop: int | None = None
    mean: tuple[float, ...] | None = None  # e.g. ImageNet's (0.485, 0.456, 0.406)
    std: tuple[float, ...] | None = None  # e.g. ImageNet's (0.229, 0.224, 0.225)

    def check(self, section: str) -> None:
        for key in ("resize", "crop"):
            if getattr(self, key) is not None:
                _range(f"{section}.{key}", getattr(self, key), 1, None)
        if (self.mean is None) != (self.std is None) or (self.mean and len(self.mean) != len(self.std or ())):
            raise ParamsError(
                f"{section}: mean {self.mean} and std {self.std} must be given together, one value per channel"
            )
        if self.std is not None and min(self.std) <= 0:
            raise ParamsError(f"{section}.std = {list(self.std)}: every value must be > 0")


@dataclass(frozen=True)
class SourceParams(Checked):
    """Section `gen0.source`: generation 0 imported instead of trained. `kind` torchvision (`arch`, a
    `torchvision.models.get_model` name) or factory (`factory`, an importable `module:function`), each
    called with `kwargs` and loaded with the state_dict file `weights`; torchscript (`torch.jit.load`) or
    export (`torch.export.load`) read the model from `weights` itself. Paths are relative to the project root."""

    SECTION = "gen0.source"

    kind: str = "torchvision"
    weights: str = ""  # under teachers/, where dvc.yaml's teacher stage looks for changes
    arch: str | None = None  # kind torchvision
    factory: str | None = None  # kind factory: "package.module:function"
    kwargs: dict[str, SCALAR] = field(default_factory=dict)  # torchvision and factory: builder keywords
    transform: TransformParams = field(default_factory=TransformParams)

    def check(self, section: str) -> None:
        _one_of(f"{section}.kind", self.kind, SOURCE_KINDS)
        if not self.weights:
            raise ParamsError(f"{section}.weights: required (the teacher's file, e.g. teachers/resnet18.pt)")
        builders = {"arch": "torchvision", "factory": "factory"}  # key -> the kind that reads it
        wants = next((key for key, kind in builders.items() if kind == self.kind), None)
        for key, kind in builders.items():
            if key == wants and not getattr(self, key):
                raise ParamsError(f"{section}.{key}: required for kind {self.kind!r}")
            if key != wants and getattr(self, key) is not None:
                raise ParamsError(f"{section}.{key} = {getattr(self, key)!r}: only for kind {kind!r}; remove it")
        if wants is None and self.kwargs:
            raise ParamsError(f"{section}.kwargs: kind {self.kind!r} reads the whole model from its file; remove it")
        if self.factory is not None and (self.factory.count(":") != 1 or self.factory.startswith(":")):
            raise ParamsError(
                f"{section}.factory = {self.factory!r}: expected 'module:function', e.g. 'mypkg.nets:resnet'"
            )
        if self.arch is not None:
            from torchvision.models import list_models

            if self.arch not in list_models():
                raise ParamsError(
                    f"{section}.arch = {self.arch!r}: not a torchvision model name "
                    f"(torchvision.models.list_models(), e.g. resnet18, mobilenet_v3_small)"
                )


@dataclass(frozen=True)
class ExportParams(Checked):
    """Section `export`: how logits are written to the store."""

    SECTION = "export"

    dtype: str = "float16"
    chunk_rows: int = 1024  # rows per zarr chunk along N
    batch_size: int = 1024
    device: str = "auto"
    views: int = 1  # per sample: view 0 un-augmented, views 1..V-1 seeded crops and flips (uint8 images only)
    seed: int = 0  # of the views' crops and flips, and of the sampled layout's draws
    layout: str = "dense"  # all C logits; topk: the k largest; sampled: class counts of `samples` draws
    topk: int = 10  # layout topk: logits kept per row and view
    topk_rest: str = "uniform"  # layout topk: dropped mass spread uniformly over the other classes, or renorm
    samples: int = 32  # layout sampled: draws with replacement from the teacher distribution per row and view
    num_workers: int = 0  # data.storage: files: DataLoader worker processes decoding each chunk (0: the exporter)

    def check(self, section: str) -> None:
        _one_of(f"{section}.dtype", self.dtype, DTYPES)
        _one_of(f"{section}.device", self.device, DEVICES)
        _one_of(f"{section}.layout", self.layout, tuple(LAYOUTS))  # the store formats' registry
        _one_of(f"{section}.topk_rest", self.topk_rest, ("uniform", "renorm"))
        _range(f"{section}.chunk_rows", self.chunk_rows, 1, None)
        _range(f"{section}.batch_size", self.batch_size, 1, None)
        _range(f"{section}.views", self.views, 1, 255)
        _range(f"{section}.topk", self.topk, 1, None)
        _range(f"{section}.num_workers", self.num_workers, 0, None)
        # counts are stored in the value array: float16 holds every integer up to 2048 exactly
        _range(f"{section}.samples", self.samples, 1, 2048)


@dataclass(frozen=True)
class LaunchParams(Checked):
    """Section `launch`: how `train` and `export-logits` run: one process, or torchrun workers."""

    SECTION = "launch"

    nproc_per_node: int = 1  # > 1: the command re-launches itself under torchrun with this many workers
    nnodes: int = 1  # > 1: multi-node; every node runs the same command and meets at rdzv_endpoint
    rdzv_endpoint: str = ""  # host:port of torchrun's c10d rendezvous (nnodes > 1)
    backend: str = "auto"  # nccl on CUDA, gloo on CPU

    def check(self, section: str) -> None:
        _range(f"{section}.nproc_per_node", self.nproc_per_node, 1, None)
        _range(f"{section}.nnodes", self.nnodes, 1, None)
        _one_of(f"{section}.backend", self.backend, ("auto", "nccl", "gloo"))
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ParamsError(f"{section}.rdzv_endpoint: required when nnodes > 1 (host:port reachable by all nodes)")


@dataclass(frozen=True)
class InspectParams(Checked):
    """Section `inspect`: how `bancache inspect` reads a store."""

    SECTION = "inspect"

    temperature: float = 1.0  # softening of the raw logits before every statistic
    ece_bins: int = 15  # equal-width confidence bins of the ECE and the reliability diagram
    noise_confidence: float = 0.9  # teacher max-prob at or above which a wrong argmax flags likely label noise
    max_listed: int = 50  # likely-noisy samples listed, most confident first (all are counted)

    def check(self, section: str) -> None:
        _range(f"{section}.temperature", self.temperature, 0.0, None, lo_open=True)
        _range(f"{section}.ece_bins", self.ece_bins, 1, None)
        _range(f"{section}.noise_confidence", self.noise_confidence, 0.0, 1.0)
        _range(f"{section}.max_listed", self.max_listed, 0, None)


@dataclass(frozen=True)
class Chain:
    """Generation 0 (section `gen0`) and the students (section `students`, keyed by generation)."""

    gens: dict[int, GenParams] = field(default_factory=dict)


def section_of(gen: int) -> str:
    """The params section of generation `gen`: `gen0`, or `students.K` for K >= 1."""
    return "gen0" if gen == 0 else f"students.{gen}"


def generation_seed(recipe: TrainParams, gen: int, gp: GenParams) -> int:
    """The seed generation `gen` trains with: its own section's `seed`, else train.seed + gen."""
    return gp.seed if gp.seed is not None else recipe.seed + gen


def parse_generation(gen: int, raw: Any) -> GenParams:
    """Validate one generation's section: `gen0`, or `students.K` for K >= 1."""
    if gen == 0:
        parse_source(raw)  # gen0.source, checked here with the rest of the section
        rest = {k: v for k, v in (raw or {}).items() if k != "source"}
        gp = parse_section(GenParams, "gen0", {"loss": "ce", **rest})
        if loss_spec(gp.loss).needs_teacher or gp.teacher is not None:
            must = " or ".join(repr(n) for n in label_losses())
            raise ParamsError(
                f"gen0: generation 0 trains from labels: loss must be {must} and teacher unset "
                f"(got loss={gp.loss!r}, teacher={gp.teacher!r})"
            )
        return gp
    section = section_of(gen)
    gp = parse_section(GenParams, section, raw)
    needs = loss_spec(gp.loss).needs_teacher
    if gp.teacher is None:
        if needs:
            raise ParamsError(
                f"{section}.teacher: unset, but loss {gp.loss!r} learns from a teacher. Name the generation (or a list "
                f"of generations) whose logits generation {gen} learns from, or set loss: ce to train it from labels"
            )
        return gp  # a label-trained member of the chain (its own seed), like generation 0
    if not needs:
        raise ParamsError(
            f"{section}.loss = {gp.loss!r} ignores the teacher {gp.teacher}: use one of {', '.join(teacher_losses())}, "
            f"or set teacher: null to train generation {gen} from labels"
        )
    if isinstance(gp.teacher, list):
        _check_members(section, gen, gp.teacher)
    elif not 0 <= gp.teacher < gen:
        raise ParamsError(f"{section}.teacher = {gp.teacher}: a teacher must be an earlier generation (0..{gen - 1})")
    return gp


def parse_source(gen0_raw: Any) -> SourceParams | None:
    """Section `gen0.source` of the gen0 section `gen0_raw`: the imported teacher, or None (generation 0
    trains from labels)."""
    raw = gen0_raw.get("source") if isinstance(gen0_raw, Mapping) else None
    return None if raw is None else parse_section(SourceParams, "gen0.source", raw)


def _check_members(section: str, gen: int, members: list[int]) -> None:
    """An ensemble teacher: at least one member, each an earlier generation, none repeated."""
    if not members:
        raise ParamsError(f"{section}.teacher = []: an ensemble teacher needs at least one member generation")
    late = [m for m in members if not 0 <= m < gen]
    if late:
        raise ParamsError(
            f"{section}.teacher = {members}: member {late[0]} is not an earlier generation; every member of an "
            f"ensemble teacher must be one of 0..{gen - 1}"
        )
    repeated = sorted({m for m in members if members.count(m) > 1})
    if repeated:
        raise ParamsError(
            f"{section}.teacher = {members}: generation {repeated[0]} is listed more than once; list each member once"
        )


def student_keys(students_raw: Any) -> list[int]:
    """Generation numbers of the `students` section, whose keys are written '1', '2', ..."""
    if students_raw is None:
        return []
    if not isinstance(students_raw, Mapping):
        raise ParamsError(f"students: expected a mapping like {{'1': {{teacher: 0}}}}, got {students_raw!r}")
    gens = []
    for key in students_raw:
        if not (isinstance(key, str) and key.isdigit() and int(key) >= 1 and str(int(key)) == key):
            raise ParamsError(
                f"students.{key}: keys are generation numbers >= 1 written as quoted strings: '1', '2', ..."
            )
        gens.append(int(key))
    return sorted(gens)


def parse_chain(gen0_raw: Any, students_raw: Any) -> Chain:
    """Validate the whole chain: gen 0 learns from labels, every student from an earlier generation."""
    gens = {0: parse_generation(0, gen0_raw)}
    for gen in student_keys(students_raw):
        gens[gen] = parse_generation(gen, students_raw[str(gen)])
    for gen, gp in gens.items():
        missing = [m for m in gp.members if m not in gens]
        if missing:
            known = ", ".join(str(g) for g in sorted(gens))
            what = "no such generation" if not isinstance(gp.teacher, list) else f"no such generation {missing[0]}"
            raise ParamsError(f"{section_of(gen)}.teacher = {gp.teacher}: {what}. Generations in params: {known}")
    return Chain(gens=gens)
