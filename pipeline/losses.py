"""Losses of Born-Again Networks and knowledge distillation, as pure functions of logits.

Notation: s = student logits (B, C), t = teacher logits (B, C) read from the cache, y = labels (B,),
T = temperature, q_T = softmax(s / T), p_T = softmax(t / T). Every loss is averaged over the batch
(never over classes). Soft terms carry the T^2 factor of Hinton et al. so that their gradient scale does
not shrink as T grows; at T = 1 (the BAN paper's setting) the factor is 1. The logit MSE is the exception:
it matches logits, not distributions, so it takes no temperature and no `Probs`.

Every `teacher` argument also accepts a `Probs`: a teacher distribution given directly instead of logits,
as sparse stores provide (top-k or sampled classes, `pipeline.cache.reader.CachedTargets.target`). Its
temperature was applied when it was built, so `soften` returns it unchanged.

Transfer sets: a label y = -1 (`pipeline.core.labels.UNLABELLED`) marks a row without a label. Every label
term is a sum over the batch's labelled rows divided by the whole batch size B (an unlabelled row adds 0 to
it, its soft term as usual), so each row's loss is the same whether or not the batch holds unlabelled rows;
DKD splits an unlabelled row into target and non-target classes at the teacher's argmax.

Each loss is declared once, as a `LossSpec` in the registry `LOSSES` (`register_loss`): params validates
loss names against it, training builds its criterion from it, fitness asks it which losses are label-free
and the tables take their loss columns from it. Nothing else lists the losses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F

from pipeline.core.errors import ParamsError
from pipeline.core.labels import UNLABELLED


@dataclass(frozen=True)
class Probs:
    """A teacher distribution p_T (B, C), rows summing to 1, already at the loss's temperature."""

    p: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Probs:
        return Probs(self.p.to(device, non_blocking=non_blocking))


Teacher = torch.Tensor | Probs  # raw teacher logits (B, C), or a distribution


def soften(logits: Teacher, temperature: float = 1.0) -> torch.Tensor:
    """Teacher distribution p_T = softmax(t / T), computed in float32 from raw (possibly fp16) logits;
    a `Probs` is returned as is (its temperature is already applied)."""
    if isinstance(logits, Probs):
        return logits.p.detach().float()
    return F.softmax(logits.detach().float() / temperature, dim=-1)


def soft_cross_entropy(student: torch.Tensor, target: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """mean_b [ -sum_c target_bc * log q_T,bc ]: cross-entropy from a target distribution to q_T."""
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    return -(target * log_q).sum(dim=-1).mean()


def ce_loss(student: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Label cross-entropy at T = 1 (generation 0), (1/B) sum_b [ -log q_b,y_b ] over the labelled rows b
    (an unlabelled row, y = -1, adds 0). Without unlabelled rows this is exactly the mean: on the CPU the
    same bits as F.cross_entropy's default reduction, value and gradient."""
    return F.cross_entropy(student.float(), labels, ignore_index=UNLABELLED, reduction="sum") / max(len(labels), 1)


def ban_loss(student: torch.Tensor, teacher: Teacher, temperature: float = 1.0) -> torch.Tensor:
    """BAN (Furlanello et al. 2018, eq. 1 with the teacher's output as target):
    T^2 * mean_b CE(p_T, q_T). No label term."""
    return temperature**2 * soft_cross_entropy(student, soften(teacher, temperature), temperature)


def ban_l_loss(student: torch.Tensor, teacher: Teacher, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """BAN+L (Furlanello et al. 2018): BAN loss plus the label cross-entropy at T = 1."""
    return ban_loss(student, teacher, temperature) + ce_loss(student, labels)


def kd_loss(
    student: torch.Tensor,
    teacher: Teacher,
    labels: torch.Tensor,
    temperature: float = 4.0,
    alpha: float = 0.5,
) -> torch.Tensor:
    """Hinton, Vinyals & Dean 2015: alpha * CE(y, q_1) + (1 - alpha) * T^2 * KL(p_T || q_T),
    the KL summed over classes and averaged over the batch ('batchmean')."""
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    kl = F.kl_div(log_q, soften(teacher, temperature), reduction="batchmean")
    return alpha * ce_loss(student, labels) + (1.0 - alpha) * temperature**2 * kl


def cwtm_loss(student: torch.Tensor, teacher: Teacher, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """CWTM (Furlanello et al. 2018): label cross-entropy, sample b weighted by
    max_c p_T,bc / sum_u max_c p_T,uc (the teacher's confidence, even where it is wrong)."""
    conf = soften(teacher, temperature).max(dim=-1).values
    weights = conf / conf.sum()
    per_sample = F.cross_entropy(student.float(), labels, reduction="none", ignore_index=UNLABELLED)
    return (weights * per_sample).sum()


def permute_dark_knowledge(p: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Return p with each row's non-argmax entries randomly permuted; the argmax entry stays in place."""
    b, c = p.shape
    top = p.argmax(dim=-1, keepdim=True)
    cols = torch.arange(c, device=p.device).expand(b, c)
    is_top = cols == top
    # Non-argmax columns in ascending order (argmax sorted last) ...
    others = torch.where(is_top, c, cols).argsort(dim=-1)[:, : c - 1]
    # ... and the same columns in random order.
    keys = torch.rand(b, c, generator=generator, device="cpu").to(p.device)
    shuffled = torch.where(is_top, 2.0, keys).argsort(dim=-1)[:, : c - 1]
    out = p.clone()
    out.scatter_(1, others, p.gather(1, shuffled))
    return out


def dkpp_loss(
    student: torch.Tensor,
    teacher: Teacher,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DKPP (Furlanello et al. 2018): BAN loss against p_T with its non-argmax entries permuted per
    sample: T^2 * mean_b CE(perm(p_T), q_T). No label term."""
    target = permute_dark_knowledge(soften(teacher, temperature), generator)
    return temperature**2 * soft_cross_entropy(student, target, temperature)


def _log_binary_and_rest(z: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From logits z (B, C) already divided by T and the target mask `gt` (B, C): log [p_gt, 1 - p_gt] (B, 2)
    of softmax(z), and the log of the non-target classes' renormalised softmax (B, C), -inf at the target.
    Both in log space, exactly: 1 - p_gt is exp(logsumexp of the non-target logits - logsumexp of all), never
    a subtraction from 1 (which rounds to 0 for a confident teacher)."""
    rest = z.masked_fill(gt, float("-inf"))
    lse_all, lse_rest = torch.logsumexp(z, dim=-1), torch.logsumexp(rest, dim=-1)
    log_b = torch.stack([(z * gt).sum(dim=-1) - lse_all, lse_rest - lse_all], dim=-1)
    return log_b, rest - lse_rest.unsqueeze(-1)


def _kl_rows(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """sum_c p_c (log p_c - log q_c) per row, with 0 log 0 = 0 (entries where p is 0 add nothing)."""
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(dim=-1)


def dkd_loss(
    student: torch.Tensor,
    teacher: Teacher,
    labels: torch.Tensor,
    temperature: float = 4.0,
    alpha: float = 1.0,
    beta: float = 8.0,
) -> torch.Tensor:
    """DKD (Zhao et al. 2022, Decoupled Knowledge Distillation), as mdistiller's `DKD` without its warmup:
    CE(y, q_1) + alpha * T^2 * mean_b TCKD + beta * T^2 * mean_b NCKD, where TCKD = KL(b_T || b_S) over the
    binary (target, non-target) probabilities b = [p_y, 1 - p_y] at T, and NCKD = KL(p^_T || q^_T) over the
    non-target classes' distributions renormalised to sum to 1 (p^_c = p_c / (1 - p_y), c != y). The defaults
    are mdistiller's CIFAR ones (CE weight 1, alpha 1, beta 8, T 4).

    Teacher logits give p^_T as the softmax of the non-target logits (the target logit excluded exactly, where
    mdistiller subtracts 1000 from it: the same up to exp(-1000)); a `Probs` teacher gives it by renormalising
    its non-target probabilities, the same distribution up to float rounding (a row with no non-target mass
    adds no NCKD). The student is always taken from its logits, in log space. An unlabelled row (y = -1)
    has no CE term, and its target class for TCKD and NCKD is the teacher's argmax."""
    t_arg = (teacher.p if isinstance(teacher, Probs) else teacher).argmax(dim=-1)
    gt = F.one_hot(torch.where(labels == UNLABELLED, t_arg, labels), student.shape[-1]).bool()
    log_b_s, log_rest_s = _log_binary_and_rest(student.float() / temperature, gt)
    if isinstance(teacher, Probs):
        p = teacher.p.detach().float()
        rest = p.masked_fill(gt, 0.0)
        mass = rest.sum(dim=-1, keepdim=True)
        b_t = torch.cat([(p * gt).sum(dim=-1, keepdim=True), mass], dim=-1)
        rest_t = rest / mass.clamp_min(torch.finfo(torch.float32).tiny)
        log_b_t, log_rest_t = b_t.log(), rest_t.log()
    else:
        log_b_t, log_rest_t = _log_binary_and_rest(teacher.detach().float() / temperature, gt)
        b_t, rest_t = log_b_t.exp(), log_rest_t.exp()
    tckd = _kl_rows(b_t, log_b_t, log_b_s).mean()
    nckd = _kl_rows(rest_t, log_rest_t, log_rest_s).mean()
    return ce_loss(student, labels) + temperature**2 * (alpha * tckd + beta * nckd)


def mse_loss(student: torch.Tensor, teacher: Teacher) -> torch.Tensor:
    """Logit MSE (Kim et al. 2021, "Comparing Kullback-Leibler Divergence and Mean Squared Error Loss in
    Knowledge Distillation": ||z_s - z_t||^2 per sample): mean_b sum_c (s_bc - t_bc)^2 after centring each row
    of s and of t on its mean over classes. Centring matches the logits up to a per-row constant, which softmax
    cannot see and stores do not keep: float16 rows are stored minus their max (`logit_shift: row_max`), and
    the centred difference is the same for the stored and the raw teacher. No temperature, no label term.
    (Kim et al.'s code averages over classes as well, nn.MSELoss: 1/C of this, the same minimiser.)
    A `Probs` teacher (a sparse store) has no logits to match and is refused."""
    if isinstance(teacher, Probs):
        raise ValueError("loss 'mse' matches logits: a teacher distribution (a sparse store) has none")
    s, t = student.float(), teacher.detach().float()
    d = (s - s.mean(dim=-1, keepdim=True)) - (t - t.mean(dim=-1, keepdim=True))
    return d.pow(2).sum(dim=-1).mean()


# ---------------------------------------------------------------- the registry

# The bound form every loss is called in: fn(student, teacher, labels, temperature, alpha, beta, generator).
# `teacher` is None only for a loss that needs none; `generator` draws DKPP's permutations.
LossFn = Callable[
    [torch.Tensor, Teacher | None, torch.Tensor, float, float, float, torch.Generator | None],
    torch.Tensor,
]


@dataclass(frozen=True)
class LossSpec:
    """One loss, declared once: everything params, training, fitness and the tables need to know of it.

    `label_free`: no label term, the teacher's targets are all the student sees (fitness warns about a
    poor teacher). `column`: the Table 2 column of a first student trained with it (None for a loss that
    needs no teacher: generation 0 is the table's Teacher column). `params`: the generation keys (GenParams
    fields) the loss reads; it ignores the others. `needs_logits`: the loss matches the teacher's logits
    themselves, so a store that holds a distribution only (a sparse layout) cannot serve it; training refuses
    such a store before its first step. `label_rows_only`: a teacher loss that learns nothing from a row
    without a label (CWTM weights the label term only), so on a transfer set it trains on the labelled rows
    as label losses do (`learns_unlabelled`).
    """

    name: str
    fn: LossFn
    needs_teacher: bool
    label_free: bool
    column: str | None
    params: tuple[str, ...] = ()
    needs_logits: bool = False
    label_rows_only: bool = False

    @property
    def learns_unlabelled(self) -> bool:
        """Whether a student with this loss trains on a transfer set's unlabelled rows too."""
        return self.needs_teacher and not self.label_rows_only

    def __call__(
        self,
        student: torch.Tensor,
        teacher: Teacher | None,
        labels: torch.Tensor,
        temperature: float = 1.0,
        alpha: float = 0.5,
        beta: float = 8.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The loss of one batch; a teacher loss refuses a missing teacher before computing anything."""
        if self.needs_teacher and teacher is None:
            raise ValueError(f"loss {self.name!r} needs teacher logits")
        return self.fn(student, teacher, labels, temperature, alpha, beta, generator)


LOSSES: dict[str, LossSpec] = {}  # in declaration order: params' messages list the names in it


def register_loss(spec: LossSpec) -> LossSpec:
    """Add `spec` to the registry; params, training, fitness, the sweep and the tables then know it.
    A name or column already taken is refused: two declarations of one loss would disagree somewhere."""
    if spec.name in LOSSES:
        raise ValueError(f"loss {spec.name!r} is already registered; pick another name")
    if spec.needs_teacher != (spec.column is not None):
        raise ValueError(f"loss {spec.name!r}: a teacher loss names its table column, a label loss names none")
    if spec.column is not None and spec.column in loss_columns().values():
        raise ValueError(f"loss {spec.name!r}: column {spec.column!r} is already another loss's")
    LOSSES[spec.name] = spec
    return spec


def loss_spec(name: str) -> LossSpec:
    """The registered loss `name`; an unknown name is refused with the list of known ones."""
    if name not in LOSSES:
        raise ParamsError(f"unknown loss {name!r}; known: {', '.join(LOSSES)}")
    return LOSSES[name]


def teacher_losses() -> tuple[str, ...]:
    """The losses that learn from a teacher's cached logits (a student's), in declaration order."""
    return tuple(n for n, s in LOSSES.items() if s.needs_teacher)


def label_losses() -> tuple[str, ...]:
    """The losses that need no teacher (generation 0's and the controls'), in declaration order."""
    return tuple(n for n, s in LOSSES.items() if not s.needs_teacher)


def label_free_losses() -> tuple[str, ...]:
    """The losses with no label term, in declaration order."""
    return tuple(n for n, s in LOSSES.items() if s.label_free)


def loss_columns() -> dict[str, str]:
    """Loss name -> its Table 2 column, for every loss that has one."""
    return {n: s.column for n, s in LOSSES.items() if s.column is not None}


def _given(teacher: Teacher | None) -> Teacher:
    """`teacher` as the teacher losses take it: `LossSpec.__call__` has refused None already."""
    return cast(Teacher, teacher)


# The eight losses, in the order params' messages list them; each lambda calls its pure function above with
# exactly the arguments that function takes.
register_loss(
    LossSpec(
        "ce",
        lambda s, _t, y, _temp, _alpha, _beta, _g: ce_loss(s, y),
        needs_teacher=False,
        label_free=False,
        column=None,
    )
)
register_loss(
    LossSpec(
        "ban",
        lambda s, t, _y, temp, _alpha, _beta, _g: ban_loss(s, _given(t), temp),
        needs_teacher=True,
        label_free=True,
        column="BAN",
        params=("temperature",),
    )
)
register_loss(
    LossSpec(
        "ban+l",
        lambda s, t, y, temp, _alpha, _beta, _g: ban_l_loss(s, _given(t), y, temp),
        needs_teacher=True,
        label_free=False,
        column="BAN+L",
        params=("temperature",),
    )
)
register_loss(
    LossSpec(
        "kd",
        lambda s, t, y, temp, alpha, _beta, _g: kd_loss(s, _given(t), y, temp, alpha),
        needs_teacher=True,
        label_free=False,
        column="KD",
        params=("temperature", "alpha"),
    )
)
register_loss(
    LossSpec(
        "cwtm",
        lambda s, t, y, temp, _alpha, _beta, _g: cwtm_loss(s, _given(t), y, temp),
        needs_teacher=True,
        label_free=False,
        column="CWTM",
        params=("temperature",),
        label_rows_only=True,
    )
)
register_loss(
    LossSpec(
        "dkpp",
        lambda s, t, _y, temp, _alpha, _beta, g: dkpp_loss(s, _given(t), temp, g),
        needs_teacher=True,
        label_free=True,
        column="DKPP",
        params=("temperature",),
    )
)
register_loss(
    LossSpec(
        "dkd",
        lambda s, t, y, temp, alpha, beta, _g: dkd_loss(s, _given(t), y, temp, alpha, beta),
        needs_teacher=True,
        label_free=False,
        column="DKD",
        params=("temperature", "alpha", "beta"),
    )
)
register_loss(
    LossSpec(
        "mse",
        lambda s, t, _y, _temp, _alpha, _beta, _g: mse_loss(s, _given(t)),
        needs_teacher=True,
        label_free=True,
        column="MSE",
        params=(),
        needs_logits=True,
    )
)


def generation_loss(
    name: str,
    student: torch.Tensor,
    teacher: Teacher | None,
    labels: torch.Tensor,
    temperature: float = 1.0,
    alpha: float = 0.5,
    beta: float = 8.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The loss `name` of the registry on one batch (what a training step computes, without a model)."""
    return loss_spec(name)(student, teacher, labels, temperature, alpha, beta, generator)
