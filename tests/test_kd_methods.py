"""Distillation losses against independent computations, and the contract every method keeps:
gradients reach the student (and learned parts such as the FitNets regressor), never the
teacher, and the teacher stays in eval mode."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdpipe import models
from kdpipe.config import parse_params
from kdpipe.distill import METHODS, BatchContext, FrozenTeacher, OnlineTeacher, get_method, soft_kl
from kdpipe.distill.attention import AttentionTransfer, CombinedKD
from kdpipe.distill.dkd import DKD, warmup_factor
from kdpipe.distill.features import pair_stages
from kdpipe.distill.fitnets import FitNets
from kdpipe.distill.logit import LogitKD
from kdpipe.distill.losses import attention_transfer_loss, dkd_terms, ensemble_log_probs, hint_loss
from kdpipe.distill.multi_teacher import MultiTeacherKD

S = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, -0.4], [-1.0, 3.0, 0.5, 1.0]])
T = torch.tensor([[1.0, 1.5, -0.5, 0.2], [2.0, -1.0, 0.0, 0.5], [0.0, 2.0, 2.5, -1.0]])
Y = torch.tensor([0, 3, 2])
BATCH = BatchContext(indices=torch.arange(3), epoch=0)


def probs(z, t):
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


# ---- logit KD -------------------------------------------------------------------------------


def test_soft_kl_matches_explicit_probabilities():
    for t in (1.0, 4.0):
        expected = sum(kl(probs(z, t), probs(s, t)) for s, z in zip(S.tolist(), T.tolist())) / 3 * t * t
        assert soft_kl(S, T, t).item() == pytest.approx(expected, rel=1e-5)


def test_soft_kl_large_temperature_becomes_logit_matching():
    # T² KL → (1/2K) Σ_i ((s_i - mean s) - (t_i - mean t))², averaged over the batch (Hinton et al.)
    d = (S - S.mean(1, keepdim=True)) - (T - T.mean(1, keepdim=True))
    limit = (d.pow(2).sum(1) / (2 * S.shape[1])).mean().item()
    assert soft_kl(S, T, 200.0).item() == pytest.approx(limit, rel=2e-2)


def test_logit_kd_alpha_limits_and_identical_models():
    student = models.build("student_cnn", 1, 4, 8, widths=[8, 16])
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        logits = student.eval()(x)
    for alpha in (0.0, 1.0):
        obj = LogitKD(student, OnlineTeacher(models.build("student_cnn", 1, 4, 8, widths=[8, 16])), 4.0, alpha)
        out, terms = obj.eval().forward_train(x, Y, BATCH)
        ce = F.cross_entropy(out, Y)
        if alpha == 0.0:
            assert terms["kd"].item() == 0.0 and terms["ce"].item() == pytest.approx(ce.item(), rel=1e-6)
        else:
            assert terms["ce"].item() == 0.0
    # the student as its own teacher: nothing to distil
    same = LogitKD(student, OnlineTeacher(_copy(student)), 4.0, 0.9).eval()
    _, terms = same.forward_train(x, Y, BATCH)
    assert terms["kd"].item() == pytest.approx(0.0, abs=1e-6)
    assert logits.shape == (3, 4)


# ---- DKD ------------------------------------------------------------------------------------


def dkd_explicit(s_rows, t_rows, labels, t):
    """TCKD/NCKD from explicit target / non-target probabilities, in float64 Python."""
    tckd = nckd = 0.0
    for s, z, y in zip(s_rows, t_rows, labels):
        ps, pt = probs(s, t), probs(z, t)
        bs, bt = [ps[y], 1 - ps[y]], [pt[y], 1 - pt[y]]
        tckd += kl(bt, bs)
        qs = [p / (1 - ps[y]) for i, p in enumerate(ps) if i != y]
        qt = [p / (1 - pt[y]) for i, p in enumerate(pt) if i != y]
        nckd += kl(qt, qs)
    n = len(labels)
    return tckd / n * t * t, nckd / n * t * t


@pytest.mark.parametrize("t", [1.0, 4.0, 50.0])
def test_dkd_terms_match_explicit_probabilities(t):
    tckd, nckd = dkd_terms(S, T, Y, t)
    e_tckd, e_nckd = dkd_explicit(S.tolist(), T.tolist(), Y.tolist(), t)
    assert tckd.item() == pytest.approx(e_tckd, rel=2e-3, abs=1e-7)
    assert nckd.item() == pytest.approx(e_nckd, rel=2e-3, abs=1e-7)


def test_dkd_decomposes_kd():
    # Zhao et al. eq. (4): KD = TCKD + (1 - p_t^T) · NCKD, per sample
    t = 2.0
    for i in range(3):
        tckd, nckd = dkd_terms(S[i:i + 1], T[i:i + 1], Y[i:i + 1], t)
        p_target = torch.softmax(T[i] / t, 0)[Y[i]].item()
        assert soft_kl(S[i:i + 1], T[i:i + 1], t).item() == pytest.approx(
            tckd.item() + (1 - p_target) * nckd.item(), rel=1e-4)


def test_dkd_weights_warmup_and_identical_logits():
    student = models.build("student_cnn", 1, 4, 8, widths=[8])
    x = torch.randn(3, 1, 8, 8)
    teacher = models.build("student_cnn", 1, 4, 8, widths=[8]).eval()
    for (a, b) in ((0.0, 8.0), (1.0, 0.0)):
        obj = DKD(student, OnlineTeacher(teacher), 4.0, dkd_alpha=a, dkd_beta=b, warmup_epochs=0).eval()
        _, terms = obj.forward_train(x, Y, BATCH)
        assert (terms["tckd"].item() == 0.0) == (a == 0.0)
        assert (terms["nckd"].item() == 0.0) == (b == 0.0)
    assert [warmup_factor(e, 4) for e in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0
    obj = DKD(student, OnlineTeacher(teacher), 4.0, dkd_alpha=1.0, dkd_beta=8.0, warmup_epochs=4).eval()
    _, early = obj.forward_train(x, Y, BatchContext(torch.arange(3), 0))
    _, late = obj.forward_train(x, Y, BatchContext(torch.arange(3), 7))
    assert early["nckd"].item() == pytest.approx(late["nckd"].item() / 4, rel=1e-5)
    same = DKD(student, OnlineTeacher(_copy(student)), 4.0, warmup_epochs=0).eval()
    _, terms = same.forward_train(x, Y, BATCH)
    assert terms["tckd"].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["nckd"].item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(torch.stack(list(dkd_terms(S * 100, T * 100, Y, 1.0)))).all()


# ---- attention transfer ---------------------------------------------------------------------


def at_explicit(fs, ft, p=2):
    """Loops: map[n][j] = mean_c |f|^p, normalised per sample, squared difference averaged."""
    n, _, h, w = fs.shape
    total = 0.0
    for i in range(n):
        a_s = [sum(abs(fs[i, c, y, x].item()) ** p for c in range(fs.shape[1])) / fs.shape[1]
               for y in range(h) for x in range(w)]
        a_t = [sum(abs(ft[i, c, y, x].item()) ** p for c in range(ft.shape[1])) / ft.shape[1]
               for y in range(h) for x in range(w)]
        ns, nt = math.sqrt(sum(v * v for v in a_s)), math.sqrt(sum(v * v for v in a_t))
        total += sum((u / ns - v / nt) ** 2 for u, v in zip(a_s, a_t)) / (h * w)
    return total / n


def test_attention_loss_hand_computed_value():
    fs = torch.tensor([[[[1.0, 0.0]]]])  # one channel, a 1×2 map: q_s = [1, 0]
    ft = torch.tensor([[[[0.0, 3.0]]]])  # q_t = [0, 1]
    assert attention_transfer_loss(fs, ft).item() == pytest.approx(1.0)  # ((1-0)² + (0-1)²) / 2


def test_attention_loss_matches_loops_and_handles_channels_and_p():
    gen = torch.Generator().manual_seed(0)
    fs, ft = torch.randn(2, 3, 3, 3, generator=gen), torch.randn(2, 5, 3, 3, generator=gen)
    for p in (1, 2, 3):
        assert attention_transfer_loss(fs, ft, p).item() == pytest.approx(at_explicit(fs, ft, p), rel=1e-5)
    assert attention_transfer_loss(fs, fs * 7).item() == pytest.approx(0.0, abs=1e-7)  # scale-free


def test_attention_loss_resizes_the_teacher_map_by_area():
    gen = torch.Generator().manual_seed(1)
    fs, ft = torch.randn(2, 3, 2, 2, generator=gen), torch.randn(2, 4, 4, 4, generator=gen)
    a_t = ft.pow(2).mean(1)
    pooled = torch.stack([torch.stack([a_t[:, 2 * y:2 * y + 2, 2 * x:2 * x + 2].mean((1, 2)) for x in range(2)], 1)
                          for y in range(2)], 1)  # explicit 2×2 block means
    # a 1-channel teacher feature whose squared map is the pooled map
    expected = at_explicit(fs, pooled.sqrt().unsqueeze(1))
    assert attention_transfer_loss(fs, ft).item() == pytest.approx(expected, rel=1e-5)
    # enlarging works too (student larger than teacher)
    assert torch.isfinite(attention_transfer_loss(ft, fs))


def test_attention_objective_terms_and_beta():
    student = models.build("student_cnn", 1, 4, 8, widths=[8, 16, 32])
    teacher = models.build("resnet18", 1, 4, 8).eval()
    x = torch.randn(3, 1, 8, 8)
    obj = AttentionTransfer(student, teacher, beta=1000.0, p=2).eval()
    assert obj.pairs == [("blocks.0", "layer2"), ("blocks.1", "layer3"), ("blocks.2", "layer4")]
    logits, terms = obj.forward_train(x, Y, BATCH)
    with models.FeatureTap(student, ["blocks.0", "blocks.1", "blocks.2"]) as ts, \
            models.FeatureTap(teacher, ["layer2", "layer3", "layer4"]) as tt:
        student(x), teacher(x)
    expected = 500.0 * sum(at_explicit(a, b) for a, b in zip(ts.features, tt.features))
    assert terms["at"].item() == pytest.approx(expected, rel=1e-4)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(logits, Y).item(), rel=1e-6)
    assert AttentionTransfer(student, teacher, beta=0.0).eval().forward_train(x, Y, BATCH)[1]["at"].item() == 0.0
    same = AttentionTransfer(student, _copy(student), beta=1000.0).eval()
    assert same.forward_train(x, Y, BATCH)[1]["at"].item() == pytest.approx(0.0, abs=1e-6)


def test_combined_is_logit_kd_plus_attention():
    student = models.build("student_cnn", 1, 4, 8, widths=[8, 16])
    teacher = models.build("student_cnn", 1, 4, 8, widths=[16, 32]).eval()
    x = torch.randn(3, 1, 8, 8)
    targets = OnlineTeacher(teacher)
    combined = CombinedKD(student, teacher, targets, temperature=3.0, alpha=0.7, beta=10.0).eval()
    _, c = combined.forward_train(x, Y, BATCH)
    _, l = LogitKD(student, targets, 3.0, 0.7).eval().forward_train(x, Y, BATCH)
    _, a = AttentionTransfer(student, teacher, beta=10.0).eval().forward_train(x, Y, BATCH)
    assert set(c) == {"kd", "ce", "at"}
    for k in ("kd", "ce"):
        assert c[k].item() == pytest.approx(l[k].item(), rel=1e-6)
    assert c["at"].item() == pytest.approx(a["at"].item(), rel=1e-6)


def test_stage_pairing():
    assert pair_stages(["s0", "s1", "s2"], ["t1", "t2", "t3", "t4"]) == [("s0", "t2"), ("s1", "t3"), ("s2", "t4")]
    assert pair_stages(["s0", "s1"], ["t1", "t2"]) == [("s0", "t1"), ("s1", "t2")]
    # more student stages than teacher stages: spread evenly, first to first and last to last
    assert [t for _, t in pair_stages(list("abcde"), ["t1", "t2", "t3"])] == ["t1", "t1", "t2", "t3", "t3"]


# ---- FitNets --------------------------------------------------------------------------------


def test_hint_loss_matches_explicit_mse_with_resize():
    gen = torch.Generator().manual_seed(2)
    r, ft = torch.randn(2, 3, 2, 2, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)
    pooled = F.avg_pool2d(ft, 2)
    expected = sum((r[i, c, y, x] - pooled[i, c, y, x]).item() ** 2
                   for i in range(2) for c in range(3) for y in range(2) for x in range(2)) / 24
    assert hint_loss(r, ft).item() == pytest.approx(expected, rel=1e-5)
    assert hint_loss(ft, ft).item() == 0.0


def test_fitnets_regressor_shapes_and_identity_gives_zero_hint():
    student = models.build("student_cnn", 1, 4, 8, widths=[8, 16, 32])
    teacher = models.build("resnet18", 1, 4, 8).eval()
    obj = FitNets(student, teacher, input_shape=(1, 8, 8), beta=100.0)
    assert (obj.student_layer, obj.teacher_layer) == ("blocks.1", "layer3")
    conv = obj.regressor[0]
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (16, 256, (1, 1))
    # the student as teacher with an identity regressor: hint 0
    twin = FitNets(student, _copy(student), input_shape=(1, 8, 8), beta=100.0).eval()
    with torch.no_grad():
        twin.regressor[0].weight.copy_(torch.eye(16).view(16, 16, 1, 1))
        twin.regressor[1].eval()
    _, terms = twin.forward_train(torch.randn(3, 1, 8, 8), Y, BATCH)
    assert terms["hint"].item() == pytest.approx(0.0, abs=1e-6)


# ---- multi-teacher --------------------------------------------------------------------------


def test_ensemble_target_is_the_average_of_softened_outputs():
    t2 = T.flip(1)
    got = ensemble_log_probs([T, t2], 3.0).exp()
    expected = torch.tensor([[(a + b) / 2 for a, b in zip(probs(r1, 3.0), probs(r2, 3.0))]
                             for r1, r2 in zip(T.tolist(), t2.tolist())])
    assert torch.allclose(got, expected, atol=1e-6)
    # one teacher, or K identical teachers: plain Hinton KD
    assert torch.allclose(ensemble_log_probs([T, T, T], 2.0), F.log_softmax(T / 2.0, 1), atol=1e-6)


def test_multi_teacher_loss_and_limits():
    student = models.build("student_cnn", 1, 4, 8, widths=[8])
    t1 = models.build("student_cnn", 1, 4, 8, widths=[8]).eval()
    t2 = models.build("student_cnn", 1, 4, 8, widths=[12]).eval()
    x = torch.randn(3, 1, 8, 8)
    obj = MultiTeacherKD(student, OnlineTeacher(t1), [t2], temperature=4.0, alpha=0.9).eval()
    logits, terms = obj.forward_train(x, Y, BATCH)
    with torch.no_grad():
        z1, z2 = t1(x), t2(x)
    p = [[(a + b) / 2 for a, b in zip(probs(r1, 4.0), probs(r2, 4.0))] for r1, r2 in zip(z1.tolist(), z2.tolist())]
    expected = sum(kl(pe, probs(s, 4.0)) for pe, s in zip(p, logits.tolist())) / 3 * 16 * 0.9
    assert terms["kd"].item() == pytest.approx(expected, rel=1e-4)
    assert terms["ce"].item() == pytest.approx(0.1 * F.cross_entropy(logits, Y).item(), rel=1e-5)
    for alpha in (0.0, 1.0):
        _, t = MultiTeacherKD(student, OnlineTeacher(t1), [t2], 4.0, alpha).eval().forward_train(x, Y, BATCH)
        assert t["ce" if alpha == 1.0 else "kd"].item() == 0.0
    same = MultiTeacherKD(student, OnlineTeacher(_copy(student)), [_copy(student)], 4.0, 0.9).eval()
    assert same.forward_train(x, Y, BATCH)[1]["kd"].item() == pytest.approx(0.0, abs=1e-6)


# ---- the contract: gradients and eval mode --------------------------------------------------


def _copy(model):
    import copy

    return copy.deepcopy(model).eval()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_gradients_reach_the_student_only_and_teacher_stays_in_eval(method):
    torch.manual_seed(0)
    params = parse_params({"kd": {"methods": [method], "teachers": ["teachers/ensemble/t.pt"]}})
    student = models.build("student_cnn", 1, 4, 8, widths=[8, 16, 32])
    teacher = models.build("resnet18", 1, 4, 8)
    extra = models.build("student_cnn", 1, 4, 8, widths=[16, 16])
    teacher.train(), extra.train()  # the objective must switch them to eval itself
    obj = get_method(method)(
        student=student, teacher=teacher, targets=OnlineTeacher(teacher), kd=params.kd, temperature=4.0, alpha=0.9,
        input_shape=(1, 8, 8), extra_teachers=[extra], meta=None,
    )
    obj.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    if method == "multi_teacher":
        assert not extra.training
    teacher_params = {id(p) for p in teacher.parameters()} | {id(p) for p in extra.parameters()}
    trainable = list(obj.trainable_parameters())
    assert not teacher_params & {id(p) for p in trainable}
    assert {id(p) for p in student.parameters()} <= {id(p) for p in trainable}
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    x = torch.randn(6, 1, 8, 8)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    logits, terms = obj.forward_train(x, labels, BatchContext(torch.arange(6), 9))
    assert logits.shape == (6, 4) and all(torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    assert all(p.grad is None for p in teacher.parameters()) and all(p.grad is None for p in extra.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    if method == "fitnets":
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in obj.regressor.parameters())
        assert {id(p) for p in obj.regressor.parameters()} <= {id(p) for p in trainable}
    # BatchNorm statistics of the teacher did not move
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert any(isinstance(m, FrozenTeacher) for m in obj.modules())


@pytest.mark.parametrize("method", ["attention", "fitnets"])
def test_teacher_stays_in_eval_mode_and_unchanged_through_the_training_engine(method, toy_data):
    from kdpipe.runtime import setup_runtime
    from kdpipe.train import fit

    params = parse_params({"student": {"epochs": 2, "batch_size": 32}, "runtime": {"threads": 1, "bf16": "off"},
                           "kd": {"methods": [method]}})
    student = models.build("student_cnn", 1, 4, 8, widths=[8, 16, 32])
    teacher = models.build("resnet18", 1, 4, 8)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    modes = []
    teacher.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    obj = get_method(method)(student=student, teacher=teacher, targets=OnlineTeacher(teacher), kd=params.kd,
                             temperature=4.0, alpha=0.9, input_shape=(1, 8, 8))
    regressor = {k: v.clone() for k, v in obj.regressor.state_dict().items()} if method == "fitnets" else {}
    result = fit(obj, toy_data, params.student, params.data.augment, setup_runtime(params.runtime, 0), 0, method)
    assert len(result.history) == 2 and f"train_{'at' if method == 'attention' else 'hint'}" in result.history[0]
    assert modes and not any(modes)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    if method == "fitnets":  # the regressor was optimised along with the student
        assert not torch.equal(regressor["0.weight"], obj.regressor.state_dict()["0.weight"])
