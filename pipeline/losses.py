"""Losses of Born-Again Networks and knowledge distillation, as pure functions of logits.

Notation: s = student logits (B, C), t = teacher logits (B, C) read from the cache, y = labels (B,),
T = temperature, q_T = softmax(s / T), p_T = softmax(t / T). Every loss is averaged over the batch
(never over classes). Soft terms carry the T^2 factor of Hinton et al. so that their gradient scale does
not shrink as T grows; at T = 1 (the BAN paper's setting) the factor is 1.

Every `teacher` argument also accepts a `Probs`: a teacher distribution given directly instead of logits,
as sparse stores provide (top-k or sampled classes, `pipeline.cache.reader.CachedTargets.target`). Its
temperature was applied when it was built, so `soften` returns it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSSES = ("ce", "ban", "ban+l", "kd", "cwtm", "dkpp")
TEACHER_LOSSES = LOSSES[1:]  # every loss but ce learns from a teacher's cached logits


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
    """Label cross-entropy, mean_b [ -log q_b,y_b ] at T = 1 (generation 0)."""
    return F.cross_entropy(student.float(), labels)


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
    per_sample = F.cross_entropy(student.float(), labels, reduction="none")
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


def generation_loss(
    name: str,
    student: torch.Tensor,
    teacher: Teacher | None,
    labels: torch.Tensor,
    temperature: float = 1.0,
    alpha: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Dispatch on the loss name of params (`LOSSES`)."""
    if name == "ce":
        return ce_loss(student, labels)
    if teacher is None:
        raise ValueError(f"loss {name!r} needs teacher logits")
    if name == "ban":
        return ban_loss(student, teacher, temperature)
    if name == "ban+l":
        return ban_l_loss(student, teacher, labels, temperature)
    if name == "kd":
        return kd_loss(student, teacher, labels, temperature, alpha)
    if name == "cwtm":
        return cwtm_loss(student, teacher, labels, temperature)
    if name == "dkpp":
        return dkpp_loss(student, teacher, temperature, generator)
    raise ValueError(f"unknown loss {name!r}; known: {', '.join(LOSSES)}")
