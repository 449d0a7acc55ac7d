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
    dkd_loss,
    dkpp_loss,
    generation_loss,
    kd_loss,
    loss_spec,
    mse_loss,
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
# DKD, label 0 on both rows. Binary (target, rest): row 0 b_T = [1/6, 5/6], b_S = [1/2, 1/2];
# row 1 b_T = [3/5, 2/5], b_S = [1/4, 3/4]. TCKD = KL(b_T || b_S):
TCKD_ROWS = [1 / 6 * math.log(1 / 3) + 5 / 6 * math.log(5 / 3), 3 / 5 * math.log(12 / 5) + 2 / 5 * math.log(8 / 15)]
# Non-target classes renormalised: row 0 p^ = [1/3, 1/2] / (5/6) = [2/5, 3/5], q^ = [1/3, 1/6] / (1/2) = [2/3, 1/3];
# row 1 p^ = [1/2, 1/2], q^ = [2/3, 1/3]. NCKD = KL(p^ || q^):
NCKD_ROWS = [2 / 5 * math.log(3 / 5) + 3 / 5 * math.log(9 / 5), 1 / 2 * math.log(3 / 4) + 1 / 2 * math.log(3 / 2)]
# Logit MSE with rows centred. Row 0: s and t both have mean ln6 / 3, so d = s - t = [ln3, 0, -ln3], sum d^2 = 2 ln^2 3.
# Row 1: d = [-ln3, ln2, 0] with mean (ln2 - ln3) / 3; sum (d - mean d)^2 = ln^2 3 + ln^2 2 - (ln2 - ln3)^2 / 3.
MSE_1 = (2 * L3**2 + L3**2 + L2**2 - (L2 - L3) ** 2 / 3) / 2
MSE_UNCENTRED = (2 * L3**2 + L3**2 + L2**2) / 2  # what plain (s - t)^2 would give


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


def py_kl(p, q) -> float:
    return sum(pc * math.log(pc / qc) for pc, qc in zip(p, q, strict=True) if pc > 0)


def py_tckd(p, q, y: int) -> float:
    """KL of the (target, rest) binary distributions of one row, in plain Python."""
    return py_kl([p[y], 1 - p[y]], [q[y], 1 - q[y]])


def py_nckd(p, q, y: int) -> float:
    """KL of the non-target classes' renormalised distributions of one row, in plain Python."""
    rest_p, rest_q = [v for c, v in enumerate(p) if c != y], [v for c, v in enumerate(q) if c != y]
    return py_kl([v / sum(rest_p) for v in rest_p], [v / sum(rest_q) for v in rest_q])


def py_mse(s_rows, t_rows) -> float:
    """mean_b sum_c of the squared difference of the row-centred logits, in plain Python."""
    total = 0.0
    for s, t in zip(s_rows, t_rows, strict=True):
        d = [a - sum(s) / len(s) - (b - sum(t) / len(t)) for a, b in zip(s, t, strict=True)]
        total += sum(v * v for v in d)
    return total / len(s_rows)


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


# ---------------------------------------------------------------- dkd


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0])
@pytest.mark.parametrize(("alpha", "beta"), [(1.0, 8.0), (0.5, 2.0), (0.0, 1.0), (1.0, 0.0)])
def test_dkd_is_ce_plus_t2_weighted_tckd_and_nckd(t, alpha, beta):
    # logits scaled by T keep p_T and q_T; the label CE is taken at T = 1 on the scaled student (KD_CE)
    ce = CE_1 if t == 1.0 else KD_CE[t]
    expected = ce + t**2 * (alpha * sum(TCKD_ROWS) / 2 + beta * sum(NCKD_ROWS) / 2)
    got = dkd_loss(logits(S_ROWS, t), logits(T_ROWS, t), Y, temperature=t, alpha=alpha, beta=beta).item()
    assert got == approx(expected)


def test_dkd_hand_values_satisfy_the_papers_decomposition_of_kd():
    # Zhao et al. 2022, eq. 7: KL(p || q) = TCKD + (1 - p_y) NCKD per row; 1 - p_0 = 5/6 (row 0) and 2/5 (row 1)
    for kl, tckd, nckd, rest in zip(KL_ROWS, TCKD_ROWS, NCKD_ROWS, [5 / 6, 2 / 5], strict=True):
        assert tckd + rest * nckd == approx(kl)


def test_dkd_defaults_are_mdistillers_t4_alpha1_beta8():
    expected = KD_CE[4.0] + 16 * (sum(TCKD_ROWS) / 2 + 8 * sum(NCKD_ROWS) / 2)
    assert dkd_loss(logits(S_ROWS, 4.0), logits(T_ROWS, 4.0), Y).item() == approx(expected)


def test_dkd_depends_on_the_label():
    # labels [2, 1]: other target and non-target splits, computed with the plain-Python helpers above
    y = torch.tensor([2, 1])
    p, q = [py_softmax(r) for r in T_ROWS], [py_softmax(r) for r in S_ROWS]
    tckd = (py_tckd(p[0], q[0], 2) + py_tckd(p[1], q[1], 1)) / 2
    nckd = (py_nckd(p[0], q[0], 2) + py_nckd(p[1], q[1], 1)) / 2
    ce = (math.log(6) + L2) / 2
    got = dkd_loss(logits(S_ROWS), logits(T_ROWS), y, temperature=1.0, alpha=1.0, beta=8.0).item()
    assert got == approx(ce + tckd + 8 * nckd)


def mdistiller_dkd(s, t, y, alpha, beta, temperature):
    """A direct transcription of mdistiller's DKD (megvii-research/mdistiller, distillers/DKD.py: dkd_loss,
    with the CE term of forward_train at weight 1 and no warmup)."""
    gt_mask = torch.zeros_like(s).scatter_(1, y.unsqueeze(1), 1).bool()
    other_mask = torch.ones_like(s).scatter_(1, y.unsqueeze(1), 0).bool()

    def cat_mask(x):
        return torch.cat([(x * gt_mask).sum(1, keepdim=True), (x * other_mask).sum(1, keepdim=True)], dim=1)

    pred_s = cat_mask(torch.softmax(s / temperature, dim=1))
    pred_t = cat_mask(torch.softmax(t / temperature, dim=1))
    tckd = torch.nn.functional.kl_div(torch.log(pred_s), pred_t, reduction="sum") * temperature**2 / y.shape[0]
    pred_t2 = torch.softmax(t / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_s2 = torch.log_softmax(s / temperature - 1000.0 * gt_mask, dim=1)
    nckd = torch.nn.functional.kl_div(log_pred_s2, pred_t2, reduction="sum") * temperature**2 / y.shape[0]
    return torch.nn.functional.cross_entropy(s, y) + alpha * tckd + beta * nckd


@pytest.mark.parametrize(("t", "alpha", "beta"), [(1.0, 1.0, 8.0), (4.0, 1.0, 8.0), (2.0, 0.5, 2.0), (4.0, 0.3, 0.0)])
def test_dkd_equals_mdistillers_formula_on_random_logits(t, alpha, beta):
    g = torch.Generator().manual_seed(11)
    s, te = 3 * torch.randn(64, 10, generator=g, dtype=torch.float64), 3 * torch.randn(64, 10, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    got = dkd_loss(s.float(), te, y, temperature=t, alpha=alpha, beta=beta).item()
    assert got == pytest.approx(mdistiller_dkd(s, te.double(), y, alpha, beta, t).item(), rel=1e-5)


@pytest.mark.parametrize("t", [1.0, 4.0])
def test_dkd_from_logits_equals_dkd_from_probs_of_the_same_teacher(t):
    g = torch.Generator().manual_seed(12)
    s, te, y = torch.randn(32, 10, generator=g), 2 * torch.randn(32, 10, generator=g), torch.randint(0, 10, (32,))
    from_logits = dkd_loss(s, te, y, temperature=t)
    from_probs = dkd_loss(s, Probs(soften(te, t)), y, temperature=t)
    torch.testing.assert_close(from_probs, from_logits, rtol=1e-5, atol=1e-6)


def test_dkd_from_logits_keeps_nckd_where_p_target_rounds_to_one():
    # teacher row [40, ln2, 0] at T = 1: p_0 = 1 - 3 e^-40 is 1.0 in float32, yet the non-target classes still
    # hold p^ = [2/3, 1/3] (softmax of [ln2, 0]); the student [0, 0, 0] has q^ = [1/2, 1/2].
    s, te, y = torch.zeros(1, 3), torch.tensor([[40.0, L2, 0.0]]), torch.tensor([0])
    assert soften(te)[0, 0].item() == 1.0
    nckd = 2 / 3 * math.log(4 / 3) + 1 / 3 * math.log(2 / 3)
    tckd = math.log(3)  # KL([1, 0] || [1/3, 2/3]) = ln 3 (the rest's e^-40 mass adds nothing visible)
    got = dkd_loss(s, te, y, temperature=1.0, alpha=1.0, beta=8.0).item()
    assert got == approx(math.log(3) + tckd + 8 * nckd)
    # a distribution with no mass off the target has no non-target distribution: that row adds no NCKD
    one_hot = dkd_loss(s, Probs(torch.tensor([[1.0, 0.0, 0.0]])), y, temperature=1.0, alpha=1.0, beta=8.0)
    assert one_hot.item() == approx(math.log(3) + tckd)


# ---------------------------------------------------------------- mse


def test_mse_is_batch_mean_of_class_sum_of_centred_squared_differences():
    assert mse_loss(logits(S_ROWS), logits(T_ROWS)).item() == approx(MSE_1)
    assert MSE_1 != approx(MSE_UNCENTRED)  # row 1's means differ, so centring changes the value
    assert MSE_1 == approx(py_mse(S_ROWS, T_ROWS))
    # summed over classes, not averaged (that would be 1/3 of it)
    assert abs(MSE_1 - MSE_1 / 3) > 0.5


def test_mse_ignores_the_temperature_and_declares_no_params():
    s, t = logits(S_ROWS), logits(T_ROWS)
    for temp in (1.0, 2.0, 4.0):
        assert generation_loss("mse", s, t, Y, temperature=temp, alpha=0.1).item() == approx(MSE_1)
    assert loss_spec("mse").params == () and loss_spec("mse").needs_logits
    assert not any(loss_spec(n).needs_logits for n in ("ban", "ban+l", "kd", "cwtm", "dkpp", "dkd"))


def test_mse_is_invariant_to_a_per_row_constant_on_teacher_or_student():
    g = torch.Generator().manual_seed(13)
    s, t = torch.randn(16, 10, generator=g), 4 * torch.randn(16, 10, generator=g)
    shift_t, shift_s = 50 * torch.randn(16, 1, generator=g), 50 * torch.randn(16, 1, generator=g)
    base = mse_loss(s, t)
    torch.testing.assert_close(mse_loss(s, t + shift_t), base, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(mse_loss(s + shift_s, t), base, rtol=1e-5, atol=1e-4)
    # a constant on one class is not a per-row constant: the loss sees it
    assert (mse_loss(s, t + torch.eye(10)[0] * 3) - base).abs() > 0.1


def test_mse_on_a_row_max_shifted_float16_store_equals_mse_on_the_raw_logits():
    """The dense format's own encoder shifts float16 rows by their max (`logit_shift: row_max`); integer
    logits make the fp16 values exact, so the shifted store gives the raw teacher's loss exactly."""
    from pipeline.cache.formats import LAYOUTS, FormatOptions

    raw = torch.tensor([[7.0, -3.0, 12.0, 0.0], [-20.0, 5.0, 5.0, 1.0]])
    values, _ = LAYOUTS["dense"].encode(raw.unsqueeze(1), "float16", 4, FormatOptions(4, "uniform", 1), None)
    stored = torch.from_numpy(values.astype("float16"))[:, 0]
    assert torch.equal(stored.float(), raw - raw.amax(dim=-1, keepdim=True))  # really shifted
    s = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, -0.5, 0.0, 2.0]])
    assert mse_loss(s, stored).item() == mse_loss(s, raw).item() == approx(py_mse(s.tolist(), raw.tolist()))
    # plain (s - t)^2 would see the shift: that is why the rows are centred
    assert ((s - stored.float()) ** 2).sum(-1).mean().item() != approx(((s - raw) ** 2).sum(-1).mean().item())


def test_mse_refuses_a_teacher_distribution():
    with pytest.raises(ValueError, match="loss 'mse' matches logits: a teacher distribution"):
        mse_loss(logits(S_ROWS), Probs(torch.tensor(P_ROWS)))


# ---------------------------------------------------------------- dispatch


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("ce", CE_1),
        ("ban", BAN_1),
        ("ban+l", BAN_1 + CE_1),
        ("kd", 0.3 * CE_1 + 0.7 * sum(KL_ROWS) / 2),
        ("cwtm", 17 / 11 * L2),
        ("dkd", CE_1 + 0.3 * sum(TCKD_ROWS) / 2 + 2.0 * sum(NCKD_ROWS) / 2),
        ("mse", MSE_1),
    ],
)
def test_generation_loss_dispatches_by_name(name, expected):
    got = generation_loss(name, logits(S_ROWS), logits(T_ROWS), Y, temperature=1.0, alpha=0.3, beta=2.0)
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
    for name in ("ban", "ban+l", "kd", "cwtm", "dkpp", "dkd", "mse"):
        with pytest.raises(ValueError, match="teacher"):
            generation_loss(name, logits(S_ROWS), None, Y)
    with pytest.raises(ValueError, match="unknown loss 'bogus'"):
        generation_loss("bogus", logits(S_ROWS), logits(T_ROWS), Y)


# ---------------------------------------------------------------- dtype, batch averaging, gradients

ALL = ["ce", "ban", "ban+l", "kd", "cwtm", "dkpp", "dkd", "mse"]


@pytest.mark.parametrize("name", ["ban", "ban+l", "kd", "cwtm", "dkpp", "dkd", "mse"])
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
    q = [py_softmax(r, 2.0) for r in S_ROWS]
    expected = {
        "dkd": ce
        + 4 * (0.5 * sum(py_tckd(pr, qr, 0) for pr, qr in zip(p, q, strict=True)) / 2)
        + 4 * (3.0 * sum(py_nckd(pr, qr, 0) for pr, qr in zip(p, q, strict=True)) / 2),
        "mse": py_mse(S_ROWS, t_rows),
        "ban": ban,
        "ban+l": ban + ce,
        "kd": 0.5 * ce + 0.5 * 4 * kl,
        "cwtm": (m[0] * L2 + m[1] * 2 * L2) / sum(m),
        "dkpp": 4 * py_soft_ce(p_perm, S_ROWS, 2.0),
    }[name]
    got = generation_loss(
        name, s, t16, Y, temperature=2.0, alpha=0.5, beta=3.0, generator=torch.Generator().manual_seed(0)
    )
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
        ("dkd", CE_1 + 0.3 * sum(TCKD_ROWS) / 2 + 2.0 * sum(NCKD_ROWS) / 2),
    ],
)
def test_every_loss_takes_a_teacher_distribution(name, expected):
    """Probs(p) gives the hand values of the logits whose softmax is p, at T = 1 (every loss but mse) ..."""
    p = Probs(torch.tensor(P_ROWS))
    got = generation_loss(name, logits(S_ROWS), p, Y, temperature=1.0, alpha=0.3, beta=2.0)
    assert got.item() == approx(expected)


@pytest.mark.parametrize("t", [2.0, 4.0])
def test_a_teacher_distribution_is_not_softened_again(t):
    """... and at T != 1 it is taken as p_T itself: only the student is divided by T."""
    s = logits(S_ROWS, t)  # q_T stays [1/2, 1/3, 1/6], [1/4, 1/2, 1/4]
    assert torch.equal(soften(Probs(torch.tensor(P_ROWS)), t), torch.tensor(P_ROWS))
    assert ban_loss(s, Probs(torch.tensor(P_ROWS)), t).item() == approx(t**2 * BAN_1)
    p = Probs(torch.tensor(P_ROWS)).to("cpu")
    assert isinstance(p, Probs) and torch.equal(p.p, torch.tensor(P_ROWS))
