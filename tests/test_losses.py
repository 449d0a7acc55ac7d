"""Exact, hand-computed values for every loss in pipeline/losses.py.

Logits are logs of small integers, so every softmax is rational. With a temperature T the logits are
multiplied by T, so p_T and q_T stay the same rationals and only the T^2 factor (and the T = 1 label term)
changes. Expected values are written in closed form with math.log; no torch.nn.functional here.

    student S (row 0: [ln3, ln2, 0], row 1: [0, ln2, 0])  ->  q = [1/2, 1/3, 1/6], [1/4, 1/2, 1/4]
    teacher P (row 0: [0, ln2, ln3], row 1: [ln3, 0, 0])  ->  p = [1/6, 1/3, 1/2], [3/5, 1/5, 1/5]
    labels y = [0, 0]: the teacher is wrong on row 0 (argmax 2) and right on row 1.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from pipeline.losses import (
    Probs,
    ban_l_loss,
    ban_loss,
    ce_loss,
    cwtm_loss,
    dkpp_loss,
    generation_loss,
    kd_loss,
    permute_dark_knowledge,
    soften,
)

L2, L3, L5 = math.log(2), math.log(3), math.log(5)
S_ROWS = [[L3, L2, 0.0], [0.0, L2, 0.0]]
T_ROWS = [[0.0, L2, L3], [L3, 0.0, 0.0]]
Y = torch.tensor([0, 0])
TOL = {"rel": 1e-6, "abs": 1e-7}

# Per-row hand values (T = 1 distributions above):
# CE(p, q) row 0 = 1/6 ln2 + 1/3 ln3 + 1/2 ln6 = 2/3 ln2 + 5/6 ln3 ; row 1 = 3/5 ln4 + 1/5 ln2 + 1/5 ln4 = 9/5 ln2
BAN_1 = (2 / 3 * L2 + 5 / 6 * L3 + 9 / 5 * L2) / 2
# label CE: row 0 -ln(1/2) = ln2 ; row 1 -ln(1/4) = 2 ln2
CE_1 = (L2 + 2 * L2) / 2
# KL(p || q) = CE(p, q) - H(p): row 0 = 1/3 ln3 ; row 1 = 9/5 ln2 + 3/5 ln3 - ln5 (summed over classes)
KL_ROWS = [L3 / 3, 9 / 5 * L2 + 3 / 5 * L3 - L5]


def logits(rows, scale: float = 1.0, requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor([[scale * v for v in r] for r in rows], requires_grad=requires_grad)


def approx(x: float):
    return pytest.approx(x, **TOL)


def py_softmax(row, t: float = 1.0) -> list[float]:
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


def xent(p_rows, q_rows) -> float:
    """mean_b -sum_c p_bc ln q_bc in plain Python floats."""
    return sum(
        -sum(pc * math.log(qc) for pc, qc in zip(p, q, strict=True)) for p, q in zip(p_rows, q_rows, strict=True)
    ) / len(p_rows)


def py_soft_ce(p_rows, s_rows, t: float = 1.0) -> float:
    return xent(p_rows, [py_softmax(s, t) for s in s_rows])


# ---------------------------------------------------------------- soften, ce


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0])
def test_soften_divides_by_temperature(t):
    p = soften(logits(T_ROWS, scale=t), t)
    assert p.dtype == torch.float32
    torch.testing.assert_close(p, torch.tensor([[1 / 6, 1 / 3, 1 / 2], [3 / 5, 1 / 5, 1 / 5]]), rtol=1e-6, atol=1e-7)


def test_ce_loss_is_label_cross_entropy():
    assert ce_loss(logits(S_ROWS), Y).item() == approx(CE_1)
    # labels [2, 1]: -ln(1/6) and -ln(1/2)
    assert ce_loss(logits(S_ROWS), torch.tensor([2, 1])).item() == approx((math.log(6) + L2) / 2)


# ---------------------------------------------------------------- ban, ban+l


def test_ban_at_t1_is_cross_entropy_to_teacher_without_label_term():
    s, t = logits(S_ROWS), logits(T_ROWS)
    assert ban_loss(s, t).item() == approx(BAN_1)
    # the value is the cross-entropy, not the KL (which would drop the teacher entropy H(p))
    assert ban_loss(s, t).item() != approx(sum(KL_ROWS) / 2)


@pytest.mark.parametrize("t", [2.0, 4.0])
def test_ban_carries_t_squared(t):
    assert ban_loss(logits(S_ROWS, t), logits(T_ROWS, t), t).item() == approx(t**2 * BAN_1)


@pytest.mark.parametrize("t", [1.0, 2.0])
def test_ban_l_adds_label_ce_at_t1(t):
    # label CE of the scaled student at T = 1:
    # row 0 q_1 = [3^t, 2^t, 1] / (3^t + 2^t + 1), row 1 q_1 = [1, 2^t, 1] / (2^t + 2)
    ce_t = (math.log((3**t + 2**t + 1) / 3**t) + math.log(2**t + 2)) / 2
    if t == 1.0:
        assert ce_t == approx(CE_1)
    got = ban_l_loss(logits(S_ROWS, t), logits(T_ROWS, t), Y, t).item()
    assert got == approx(t**2 * BAN_1 + ce_t)


# ---------------------------------------------------------------- kd


KD_CE = {2.0: (math.log(14 / 9) + math.log(6)) / 2, 4.0: (math.log(98 / 81) + math.log(18)) / 2}


@pytest.mark.parametrize("t", [2.0, 4.0])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_kd_is_alpha_ce_plus_t2_batchmean_kl(t, alpha):
    # T=2: q_1 row 0 = [9, 4, 1]/14, row 1 = [1, 4, 1]/6 ; T=4: [81, 16, 1]/98, [1, 16, 1]/18 ; label 0.
    expected = alpha * KD_CE[t] + (1 - alpha) * t**2 * sum(KL_ROWS) / 2
    got = kd_loss(logits(S_ROWS, t), logits(T_ROWS, t), Y, temperature=t, alpha=alpha).item()
    assert got == approx(expected)


def test_kd_kl_is_summed_over_classes_not_averaged_over_elements():
    t, c = 4.0, 3
    got = kd_loss(logits(S_ROWS, t), logits(T_ROWS, t), Y, temperature=t, alpha=0.0).item()
    batchmean = t**2 * sum(KL_ROWS) / 2  # 16 * 0.33180 = 5.309
    elementwise_mean = batchmean / c  # what reduction='mean' would give
    assert got == approx(batchmean)
    assert abs(got - elementwise_mean) > 1.0
    # and without the T^2 factor it would be 16 times smaller
    assert abs(got - batchmean / t**2) > 1.0


def test_kd_defaults_are_t4_alpha_half():
    expected = 0.5 * KD_CE[4.0] + 0.5 * 16 * sum(KL_ROWS) / 2
    assert kd_loss(logits(S_ROWS, 4.0), logits(T_ROWS, 4.0), Y).item() == approx(expected)


# ---------------------------------------------------------------- cwtm


def test_cwtm_weights_by_teacher_max_even_when_wrong():
    # max p = 1/2 (row 0, teacher wrong) and 3/5 (row 1); sum 11/10 -> weights 5/11, 6/11
    # per-sample CE ln2, 2 ln2  ->  5/11 ln2 + 12/11 ln2 = 17/11 ln2 (unweighted mean would be 3/2 ln2)
    got = cwtm_loss(logits(S_ROWS), logits(T_ROWS), Y).item()
    assert got == approx(17 / 11 * L2)
    # weighting by the teacher's probability of the true class (1/6, 3/5) would give (1/6 ln2 + 6/5 ln2)/(23/30)
    assert got != approx((1 / 6 * L2 + 6 / 5 * L2) / (23 / 30))


def test_cwtm_temperature_softens_confidence():
    # at T = 2: p_2 row 0 = [1, √2, √3] / (1 + √2 + √3), row 1 = [√3, 1, 1] / (√3 + 2); weights ∝ their maxima
    m0, m1 = math.sqrt(3) / (1 + math.sqrt(2) + math.sqrt(3)), math.sqrt(3) / (math.sqrt(3) + 2)
    expected = (m0 * L2 + m1 * 2 * L2) / (m0 + m1)  # label CE stays at T = 1, with no T^2 factor
    assert cwtm_loss(logits(S_ROWS), logits(T_ROWS), Y, temperature=2.0).item() == approx(expected)


# ---------------------------------------------------------------- dkpp

P4 = torch.tensor([[0.2, 0.4, 0.1, 0.3], [0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]])


def test_permute_dark_knowledge_keeps_argmax_and_permutes_the_rest():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        out = permute_dark_knowledge(P4, g)
        torch.testing.assert_close(out.sum(-1), P4.sum(-1))
        assert torch.equal(out.argmax(-1), P4.argmax(-1))
        for row_in, row_out in zip(P4.tolist(), out.tolist(), strict=True):
            top = row_in.index(max(row_in))
            assert row_out[top] == row_in[top]
            assert sorted(row_out[:top] + row_out[top + 1 :]) == sorted(row_in[:top] + row_in[top + 1 :])
    assert torch.equal(P4, torch.tensor([[0.2, 0.4, 0.1, 0.3], [0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]]))


def test_permute_dark_knowledge_reaches_every_permutation_per_row():
    row = [0.2, 0.4, 0.1, 0.3]  # argmax at column 1; 3! arrangements of {0.2, 0.1, 0.3} in columns 0, 2, 3
    g = torch.Generator().manual_seed(1)
    batch = permute_dark_knowledge(torch.tensor([row] * 300), g)  # identical rows draw independently
    seen = {(r[0], r[2], r[3]) for r in batch.tolist()}
    assert all(r[1] == pytest.approx(0.4) for r in batch.tolist())
    expected = {tuple(x) for x in itertools.permutations(torch.tensor([0.2, 0.1, 0.3]).tolist())}
    assert seen == expected
    repeated = {tuple(permute_dark_knowledge(torch.tensor([row]), g)[0].tolist()) for _ in range(300)}
    assert len(repeated) == 6


def test_permute_dark_knowledge_is_reproducible_with_a_seeded_generator():
    a = permute_dark_knowledge(P4, torch.Generator().manual_seed(7))
    b = permute_dark_knowledge(P4, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


@pytest.mark.parametrize("t", [1.0, 2.0])
def test_dkpp_loss_is_soft_ce_against_permuted_teacher(t):
    s_rows = [[L3, L2, 0.0, L5], [0.0, L2, L3, 0.0]]
    t_rows = [[0.0, L2, L3, math.log(4)], [math.log(4), L3, 0.0, L2]]  # p = [1,2,3,4]/10 and [4,3,1,2]/10
    seed = 3
    target = permute_dark_knowledge(soften(logits(t_rows, t), t), torch.Generator().manual_seed(seed))
    p = [[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.1, 0.2]]
    assert not torch.allclose(target, torch.tensor(p)), "seed left both rows unpermuted; pick another"
    # q row 0 = [3, 2, 1, 5]/11, row 1 = [1, 2, 3, 1]/7 ; loss = T^2 mean_b -sum_c target_bc ln q_bc
    q = [[3 / 11, 2 / 11, 1 / 11, 5 / 11], [1 / 7, 2 / 7, 3 / 7, 1 / 7]]
    hand = xent(target.tolist(), q)
    got = dkpp_loss(logits(s_rows, t), logits(t_rows, t), t, torch.Generator().manual_seed(seed)).item()
    assert got == approx(t**2 * hand)
    # the unpermuted (BAN) value differs, so the permutation really reaches the loss
    assert got != approx(t**2 * xent(p, q))


# ---------------------------------------------------------------- dispatch


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("ce", CE_1),
        ("ban", BAN_1),
        ("ban+l", BAN_1 + CE_1),
        ("kd", 0.3 * CE_1 + 0.7 * sum(KL_ROWS) / 2),
        ("cwtm", 17 / 11 * L2),
    ],
)
def test_generation_loss_dispatches_by_name(name, expected):
    got = generation_loss(name, logits(S_ROWS), logits(T_ROWS), Y, temperature=1.0, alpha=0.3)
    assert got.item() == approx(expected)


def test_generation_loss_dispatches_dkpp_with_temperature_and_generator():
    s, t = logits(S_ROWS, 2.0), logits(T_ROWS, 2.0)
    got = generation_loss("dkpp", s, t, Y, temperature=2.0, generator=torch.Generator().manual_seed(5))
    target = permute_dark_knowledge(soften(t, 2.0), torch.Generator().manual_seed(5))
    q = [[1 / 2, 1 / 3, 1 / 6], [1 / 4, 1 / 2, 1 / 4]]
    hand = xent(target.tolist(), q)
    assert got.item() == approx(4 * hand)


def test_generation_loss_rejects_missing_teacher_and_unknown_name():
    assert generation_loss("ce", logits(S_ROWS), None, Y).item() == approx(CE_1)
    for name in ("ban", "ban+l", "kd", "cwtm", "dkpp"):
        with pytest.raises(ValueError, match="teacher"):
            generation_loss(name, logits(S_ROWS), None, Y)
    with pytest.raises(ValueError, match="unknown loss 'bogus'"):
        generation_loss("bogus", logits(S_ROWS), logits(T_ROWS), Y)


# ---------------------------------------------------------------- dtype, batch averaging, gradients

ALL = ["ce", "ban", "ban+l", "kd", "cwtm", "dkpp"]


@pytest.mark.parametrize("name", ["ban", "ban+l", "kd", "cwtm", "dkpp"])
def test_fp16_teacher_logits_are_softened_in_float32(name):
    t16 = logits(T_ROWS).half()  # ln2, ln3 round in fp16; expected uses the rounded values, in float64
    t_rows = t16.tolist()
    p = [py_softmax(r, 2.0) for r in t_rows]
    p_perm = permute_dark_knowledge(torch.tensor(p), torch.Generator().manual_seed(0)).tolist()
    s = logits(S_ROWS)
    ce = CE_1  # the label term is taken at T = 1 on the unscaled student
    ban = 4 * py_soft_ce(p, S_ROWS, 2.0)
    kl = ban / 4 - xent(p, p)  # KL = CE(p, q) - H(p)
    m = [max(r) for r in p]
    expected = {
        "ban": ban,
        "ban+l": ban + ce,
        "kd": 0.5 * ce + 0.5 * 4 * kl,
        "cwtm": (m[0] * L2 + m[1] * 2 * L2) / sum(m),
        "dkpp": 4 * py_soft_ce(p_perm, S_ROWS, 2.0),
    }[name]
    got = generation_loss(name, s, t16, Y, temperature=2.0, alpha=0.5, generator=torch.Generator().manual_seed(0))
    assert got.dtype == torch.float32
    assert got.item() == approx(expected)


@pytest.mark.parametrize("name", ALL)
def test_loss_is_a_batch_average(name):
    # row 1 of P has equal non-argmax entries, so the DKPP permutation cannot change it
    one_s, one_t = logits(S_ROWS[1:]), logits(T_ROWS[1:])
    two_s, two_t = logits(S_ROWS[1:] * 2), logits(T_ROWS[1:] * 2)
    one = generation_loss(name, one_s, one_t, Y[:1], temperature=2.0)
    two = generation_loss(name, two_s, two_t, Y[:1].repeat(2), temperature=2.0)
    assert two.item() == approx(one.item())


@pytest.mark.parametrize("t", [1.0, 2.0])
def test_ban_gradient_is_t_times_q_minus_p_over_batch(t):
    # d/ds [T^2 mean_b CE(p_T, softmax(s/T))] = T (q_T - p_T) / B
    # q - p: row 0 = [1/3, 0, -1/3], row 1 = [-7/20, 3/10, 1/20]
    s = logits(S_ROWS, t, requires_grad=True)
    ban_loss(s, logits(T_ROWS, t), t).backward()
    expected = t * torch.tensor([[1 / 3, 0.0, -1 / 3], [-7 / 20, 3 / 10, 1 / 20]]) / 2
    torch.testing.assert_close(s.grad, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_gradients_are_finite_and_flow_to_student_only(name):
    s = logits(S_ROWS, 4.0, requires_grad=True)
    teacher = logits(T_ROWS, 4.0).half()  # as read from the cache: no grad
    loss = generation_loss(name, s, teacher, Y, temperature=4.0, generator=torch.Generator().manual_seed(0))
    assert loss.requires_grad and loss.ndim == 0
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert not teacher.requires_grad and teacher.grad is None


# ---------------------------------------------------------------- teacher given as a distribution

P_ROWS = [[1 / 6, 1 / 3, 1 / 2], [3 / 5, 1 / 5, 1 / 5]]  # softmax of T_ROWS


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("ban", BAN_1),
        ("ban+l", BAN_1 + CE_1),
        ("kd", 0.3 * CE_1 + 0.7 * sum(KL_ROWS) / 2),
        ("cwtm", 17 / 11 * L2),
    ],
)
def test_every_loss_takes_a_teacher_distribution(name, expected):
    """Probs(p) gives the hand values of the logits whose softmax is p, at T = 1 ..."""
    got = generation_loss(name, logits(S_ROWS), Probs(torch.tensor(P_ROWS)), Y, temperature=1.0, alpha=0.3)
    assert got.item() == approx(expected)


@pytest.mark.parametrize("t", [2.0, 4.0])
def test_a_teacher_distribution_is_not_softened_again(t):
    """... and at T != 1 it is taken as p_T itself: only the student is divided by T."""
    s = logits(S_ROWS, t)  # q_T stays [1/2, 1/3, 1/6], [1/4, 1/2, 1/4]
    assert torch.equal(soften(Probs(torch.tensor(P_ROWS)), t), torch.tensor(P_ROWS))
    assert ban_loss(s, Probs(torch.tensor(P_ROWS)), t).item() == approx(t**2 * BAN_1)
    p = Probs(torch.tensor(P_ROWS)).to("cpu")
    assert isinstance(p, Probs) and torch.equal(p.p, torch.tensor(P_ROWS))
