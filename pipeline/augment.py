"""CIFAR training augmentation (random crop with zero padding, horizontal flip) and normalisation.

Two ways to augment the same recipe:
- `train_transform()`: torchvision.transforms.v2 on one uint8 CHW image, drawing from torch's global RNG
  (per-sample DataLoader use; not replayable).
- `draw_params` + `apply_params` (or `augment_batch`): the crop offsets and flips of a batch drawn
  explicitly from a `torch.Generator` and applied by index arithmetic, so a view can be stored as three
  small integers per image and rebuilt bit-for-bit later (the FKD replay of Shen & Xing 2021: the student
  must see the very view the teacher's cached outputs were computed on, Beyer et al. 2022).

`apply_params` of offsets (top, left) and flip f equals torchvision's
`horizontal_flip(crop(pad(x, pad), top, left, size, size))` if f else the same without the flip.

Normalisation is separate: `normalize(x_uint8, mean, std)` = (x / 255 - mean) / std per channel, used by
training (after augmentation) and by export (on un-augmented images), with the per-dataset constants below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from torchvision.transforms import v2

PAD = 4  # pixels of zero padding on each side before the random crop
SIZE = 32  # crop side in pixels (CIFAR images are 32 x 32)

# Per-channel (R, G, B) mean and standard deviation of the training images in [0, 1], over all pixels.
# (The often-copied CIFAR-10 std (0.2023, 0.1994, 0.2010) is not the pixel std of the training set.)
STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def stats_for(dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) for a dataset with known constants; other data: `channel_stats` of its train images."""
    if dataset not in STATS:
        raise ValueError(f"no normalisation constants for {dataset!r}: known {sorted(STATS)}; use channel_stats")
    return STATS[dataset]


def channel_stats(x: np.ndarray, batch: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std over all pixels of uint8 NCHW images, on the [0, 1] scale (float64 sums)."""
    if x.ndim != 4 or len(x) == 0:
        raise ValueError(f"channel_stats needs a non-empty (N, C, H, W) array, got shape {x.shape}")
    s = np.zeros(x.shape[1])
    s2 = np.zeros(x.shape[1])
    for i in range(0, len(x), batch):
        b = x[i : i + batch].astype(np.float64) / 255.0
        s += b.sum(axis=(0, 2, 3))
        s2 += (b * b).sum(axis=(0, 2, 3))
    n = len(x) * x.shape[2] * x.shape[3]
    mean = s / n
    std = np.sqrt(np.maximum(s2 / n - mean * mean, 0.0))
    return tuple(float(m) for m in mean), tuple(float(v) for v in std)


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """float32 (x / 255 - mean) / std per channel of uint8 (B, C, H, W) images, on x's device and layout."""
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != len(mean) or len(mean) != len(std):
        raise ValueError(f"normalize expects uint8 (B, {len(mean)}, H, W) images, got {x.dtype} {tuple(x.shape)}")
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).reshape(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).reshape(1, -1, 1, 1)
    return (x.float() / 255.0 - m) / s


def train_transform(pad: int = PAD, size: int = SIZE) -> v2.Compose:
    """torchvision v2 pipeline for one uint8 (C, H, W) image: RandomCrop(size, padding=pad), flip p=0.5."""
    from torchvision.transforms import v2  # noqa: F811

    return v2.Compose([v2.RandomCrop(size, padding=pad), v2.RandomHorizontalFlip(p=0.5)])


@dataclass(frozen=True)
class AugParams:
    """One view per image: crop offsets into the padded image and a horizontal flip.

    top, left: int64 (B,) in 0..2 * pad; flip: bool (B,); pad and size as drawn.
    """

    top: torch.Tensor
    left: torch.Tensor
    flip: torch.Tensor
    pad: int
    size: int

    def to_numpy(self) -> dict[str, np.ndarray]:
        """Arrays to store next to cached targets: top/left uint8 (pad <= 127), flip bool."""
        return {
            "top": self.top.numpy().astype(np.uint8),
            "left": self.left.numpy().astype(np.uint8),
            "flip": self.flip.numpy().astype(bool),
        }

    @classmethod
    def from_numpy(cls, arrays: dict[str, np.ndarray], pad: int = PAD, size: int = SIZE) -> AugParams:
        return cls(
            torch.from_numpy(np.asarray(arrays["top"], dtype=np.int64)),
            torch.from_numpy(np.asarray(arrays["left"], dtype=np.int64)),
            torch.from_numpy(np.asarray(arrays["flip"], dtype=bool)),
            pad,
            size,
        )


def draw_params(n: int, generator: torch.Generator, pad: int = PAD, size: int = SIZE) -> AugParams:
    """Draw `n` views from `generator` (a CPU generator): top, then left, then flip, in that order.

    The draw order is part of the recipe: the same generator state always gives the same views.
    """
    if not 0 <= pad <= 127 or size < 1 or n < 0:
        raise ValueError(f"draw_params: need n >= 0, 0 <= pad <= 127, size >= 1; got n={n}, pad={pad}, size={size}")
    top = torch.randint(0, 2 * pad + 1, (n,), generator=generator, dtype=torch.int64)
    left = torch.randint(0, 2 * pad + 1, (n,), generator=generator, dtype=torch.int64)
    flip = torch.rand(n, generator=generator) < 0.5
    return AugParams(top, left, flip, pad, size)


def apply_params(x: torch.Tensor, params: AugParams) -> torch.Tensor:
    """Rebuild the views `params` describe from images x (B, C, size, size), exactly (pure indexing).

    Pads with zeros, then gathers each image's crop with its columns reversed where flip is set. Returns
    a contiguous tensor of x's dtype on x's device.
    """
    b, _, h, w = x.shape
    p, s = params.pad, params.size
    if (h, w) != (s, s) or len(params.top) != b:
        raise ValueError(
            f"apply_params: {len(params.top)} views of {s}x{s} images for a batch of shape {tuple(x.shape)}"
        )
    xp = F.pad(x, (p, p, p, p))  # (B, C, s + 2p, s + 2p), zero fill as RandomCrop's default
    dev = x.device
    ar = torch.arange(s, device=dev)
    rows = params.top.to(dev)[:, None] + ar  # (B, s)
    cols = params.left.to(dev)[:, None] + torch.where(params.flip.to(dev)[:, None], s - 1 - ar, ar)  # (B, s)
    batch = torch.arange(b, device=dev)[:, None, None]
    out = xp.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, s, s, C)
    return out.permute(0, 3, 1, 2).contiguous()


def augment_batch(x: torch.Tensor, generator: torch.Generator, pad: int = PAD, size: int = SIZE) -> torch.Tensor:
    """Random crop + flip of a batch drawn from `generator`: `apply_params(x, draw_params(len(x), ...))`."""
    return apply_params(x, draw_params(len(x), generator, pad, size))


_MASK64 = (1 << 64) - 1


def mix64(*keys: int) -> int:
    """A 63-bit seed from integer keys (splitmix64 finaliser folded over the keys): stable across runs,
    processes and platforms, unlike `hash()`."""
    h = 0x9E3779B97F4A7C15
    for k in keys:
        h = (h ^ (int(k) & _MASK64)) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1


def identity_params(n: int, pad: int = PAD, size: int = SIZE) -> AugParams:
    """`n` views that rebuild the un-augmented images: crop at (pad, pad) of the padded image, no flip."""
    full = torch.full((n,), pad, dtype=torch.int64)
    return AugParams(full, full.clone(), torch.zeros(n, dtype=torch.bool), pad, size)


def view_params(seed: int, split_id: int, rows: np.ndarray, view: int, pad: int = PAD, size: int = SIZE) -> AugParams:
    """The crop/flip of view `view` of each row in `rows`: view 0 is the clean image (`identity_params`);
    view v >= 1 of row r is `draw_params(1, ...)` from a generator seeded with mix64(seed, split_id, r, v),
    so a (row, view) pair gets the same view whichever process, chunk or batch exports it."""
    if view == 0:
        return identity_params(len(rows), pad, size)
    drawn = [
        draw_params(1, torch.Generator().manual_seed(mix64(seed, split_id, int(r), view)), pad, size) for r in rows
    ]
    if not drawn:
        return draw_params(0, torch.Generator(), pad, size)
    return AugParams(
        torch.cat([d.top for d in drawn]),
        torch.cat([d.left for d in drawn]),
        torch.cat([d.flip for d in drawn]),
        pad,
        size,
    )
