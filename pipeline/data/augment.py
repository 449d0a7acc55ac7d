"""CIFAR training augmentation (random crop with zero padding, horizontal flip) of uint8 images.

`draw_params` + `apply_params` (or `augment_batch`): the crop offsets and flips of a batch drawn
explicitly from a `torch.Generator` and applied by index arithmetic, so a view can be stored as three
small integers per image and rebuilt bit-for-bit later (the FKD replay of Shen & Xing 2021: the student
must see the very view the teacher's cached outputs were computed on, Beyer et al. 2022).

`apply_params` of offsets (top, left) and flip f equals torchvision's
`horizontal_flip(crop(pad(x, pad), top, left, size, size))` if f else the same without the flip.

Augmentation works on uint8 pixels; normalisation is the model's first step (`pipeline.models.registry.ImageInput`,
with the train images' `channel_stats` kept in the checkpoint), so training and export cannot differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.seeds import mix64 as mix64  # re-exported for its importers (teachers.export)
from pipeline.data.seeds import mix64_array

RESIZED_KIND = "resized-crop+flip"  # a store's augmentation kind whose views are boxes (i, j, h, w) + flip of files
PAD = 4  # pixels of zero padding on each side before the random crop
SIZE = 32  # crop side in pixels (CIFAR images are 32 x 32)


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
    seeds = mix64_array(seed, split_id, np.asarray(rows), view).tolist()  # all rows' mix64 at once
    drawn = [draw_params(1, torch.Generator().manual_seed(s), pad, size) for s in seeds]
    if not drawn:
        return draw_params(0, torch.Generator(), pad, size)
    return AugParams(
        torch.cat([d.top for d in drawn]),
        torch.cat([d.left for d in drawn]),
        torch.cat([d.flip for d in drawn]),
        pad,
        size,
    )
