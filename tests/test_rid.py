import math

import pytest
import torch
import torch.nn.functional as F

from rid_fast import RIDLoss, RIDSchedule
from rid_fast.distill.rid import GaussianRedundancy

SHAPES = {
    "vectors": ([(32,), (24,)], [(8,), (6,)]),
    "maps": ([(16, 8, 8), (32, 4, 4)], [(4, 8, 8), (8, 4, 4)]),
    "mixed": ([(16, 8, 8)], [(6,)]),
    "maps_of_different_sizes": ([(16, 8, 8)], [(4, 16, 16)]),
}


def _features(shapes, batch=6):
    return [torch.randn(batch, *shape) for shape in shapes]


@pytest.mark.parametrize("estimator", ["gaussian", "infonce", "smile", "mine"])
@pytest.mark.parametrize("layout", list(SHAPES))
def test_losses_on_every_feature_rank(layout, estimator):
    teacher_shapes, student_shapes = SHAPES[layout]
    rid = RIDLoss(teacher_shapes, student_shapes, num_classes=5, estimator=estimator, alpha=2.0)
    teacher, student = _features(teacher_shapes), _features(student_shapes)
    student = [s.requires_grad_() for s in student]
    labels = torch.randint(0, 5, (6,))
    losses, logs = rid.filter_phase_loss(teacher, student, labels, include_redundancy=True)
    assert set(losses) == {"filter_ce", "redundancy"} and all(torch.isfinite(v) for v in losses.values())
    assert {f"redundancy/{k}" for k in range(len(teacher))} <= set(logs)
    # the filter phase never reaches the student
    sum(losses.values()).backward()
    assert all(s.grad is None for s in student)
    losses, logs = rid.student_phase_loss(teacher, student)
    losses["redundancy"].backward()
    assert all(s.grad is not None and torch.isfinite(s.grad).all() for s in student)


def test_phase_parameter_sets_are_disjoint_and_complete():
    rid = RIDLoss(*SHAPES["maps"], num_classes=10, estimator="infonce")
    filters = {id(p) for p in rid.filter_parameters()}
    student_side = {id(p) for p in rid.student_side_parameters()}
    everything = {id(p) for p in rid.parameters()}
    assert filters and student_side
    assert not filters & student_side
    assert filters | student_side == everything


def test_filter_phase_updates_only_teacher_filters():
    rid = RIDLoss(*SHAPES["vectors"], num_classes=3)
    teacher, student = _features(SHAPES["vectors"][0]), _features(SHAPES["vectors"][1])
    losses, _ = rid.filter_phase_loss(teacher, student, torch.randint(0, 3, (6,)), include_redundancy=True)
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in rid.filter_parameters())
    assert all(p.grad is None for p in rid.student_side_parameters())


def test_gaussian_term_matches_its_formula():
    term = GaussianRedundancy(3, initial_variance=5.0, min_variance=0.1)
    torch.testing.assert_close(term.variance, torch.full((3,), 5.0))
    s, t = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    variance = term.variance.view(1, 3, 1, 1)
    torch.testing.assert_close(term(s, t), (variance.log() + (s - t) ** 2 / variance).mean())
    with torch.no_grad():
        term.rho.fill_(-50.0)
    assert float(term.variance.min().detach()) == pytest.approx(0.1)


# ---- the schedule ---------------------------------------------------------------------------------


def _pattern(schedule, total):
    return "".join(schedule.phase(p, total)[0].upper() for p in range(total))


@pytest.mark.parametrize(
    "total,expected",
    [
        (25, "FSSSS" * 5),
        (50, "FFSSSSSSSS" * 5),
        (23, "FSSSSFSSSSFSSSFSSSSFSSS"),  # rounds of 4.6 positions start at 0, 5, 10, 14, 19
    ],
)
def test_schedule_phase_boundaries(total, expected):
    assert _pattern(RIDSchedule(n_rounds=5, filter_fraction=0.2), total) == expected


@pytest.mark.parametrize("total", [5, 6, 10, 20])
def test_schedule_that_would_starve_the_student_or_break_rounds_is_refused(total):
    """Five rounds with a fifth in the filter phase need 23 epochs; shorter runs used to get 50 %
    (10 epochs), FSSSSF (6) or 100 % (5) filter epochs without a word."""
    with pytest.raises(ValueError, match=r"cannot give each of its 5 rounds .* use at least 23 epochs, or n_rounds ≤"):
        RIDSchedule().phase(0, total)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.2, 0.25, 0.3, 0.5, 0.75])
@pytest.mark.parametrize("n_rounds", [1, 2, 3, 5, 7])
def test_filter_share_follows_the_fraction_at_every_length(n_rounds, fraction):
    unit = "step" if n_rounds % 2 else "epoch"  # positions count either; the placement is the same
    schedule = RIDSchedule(n_rounds, fraction, unit)
    honoured = 0
    for total in range(1, 160):
        try:
            rounds = schedule.rounds(total)
        except ValueError as error:
            assert f"in {total} {unit}" in str(error)
            continue
        honoured += 1
        pattern = _pattern(schedule, total)
        assert pattern.count("F") == math.floor(fraction * total + 0.5)  # the nearest whole number
        assert len(rounds) == n_rounds and sum(r.length for r in rounds) == total
        assert max(r.length for r in rounds) - min(r.length for r in rounds) <= 1
        for r in rounds:
            part = pattern[r.start : r.start + r.length]
            assert part == "F" * r.filter + "S" * (r.length - r.filter)
            assert "S" in part and ("F" in part or fraction == 0)
            # each round's share is the fraction up to one position
            assert abs(r.filter - fraction * r.length) <= 1
    assert honoured >= 80


#: (total, rounds, fraction) → filter positions with the even placement and with the official code's.
OFFICIAL_CASES = {(300, 10, 0.25): (75, 80), (100, 5, 0.2): (20, 20), (100, 3, 0.25): (25, 28), (60, 7, 0.3): (18, 24)}


@pytest.mark.parametrize("case", list(OFFICIAL_CASES))
def test_both_placements_on_the_cases_checked_against_the_official_code(case):
    total, n_rounds, fraction = case
    even, paper = RIDSchedule(n_rounds, fraction), RIDSchedule(n_rounds, fraction, placement="paper")
    assert (_pattern(even, total).count("F"), _pattern(paper, total).count("F")) == OFFICIAL_CASES[case]
    assert (even.filter_positions(total), paper.filter_positions(total)) == OFFICIAL_CASES[case]
    # the official rule, written out: rounds of ⌊T/R⌋ epochs, filter while epoch mod length < fraction·length,
    # the redundancy term in the filter phase from the second round (epoch ≥ length) on
    length = int(total / n_rounds)
    official = "".join("F" if e % length < fraction * length else "S" for e in range(total))
    assert _pattern(paper, total) == official
    assert [paper.redundancy_in_filter_phase(e, total) for e in range(total)] == [e >= length for e in range(total)]


def test_redundancy_joins_the_filter_phase_after_the_first_round():
    schedule = RIDSchedule(n_rounds=4, filter_fraction=0.25)
    flags = [schedule.redundancy_in_filter_phase(p, 40) for p in range(40)]
    assert flags == [False] * 10 + [True] * 30
    assert all(RIDSchedule(4, 0.25, redundancy_from_round=0).redundancy_in_filter_phase(p, 40) for p in range(40))


@pytest.mark.parametrize("placement", ["even", "paper"])
@pytest.mark.parametrize("n_rounds,fraction", [(5, 0.2), (2, 0.25), (3, 0.3), (10, 0.25), (1, 0.0)])
def test_total_for_student_gives_exactly_that_many_student_positions(n_rounds, fraction, placement):
    schedule = RIDSchedule(n_rounds, fraction, placement=placement)
    found = 0
    for student in range(1, 400, 7):
        try:
            total = schedule.total_for_student(student)
        except ValueError as error:
            assert "student epochs" in str(error)
            continue
        found += 1
        assert _pattern(schedule, total).count("S") == student
        shorter = [t for t in range(1, total) if schedule.student_positions(t) == student]
        for t in shorter:  # the shortest schedule that can be honoured
            with pytest.raises(ValueError):
                schedule.rounds(t)
    # the paper's whole-length rounds reach only some counts (multiples of n_rounds, once rounds are long)
    assert found >= (40 if placement == "even" else 10)


def test_total_for_student_examples_and_errors():
    assert RIDSchedule().total_for_student(100) == 125
    assert RIDSchedule(unit="step").total_for_student(1000) == 1250
    assert RIDSchedule(2, 0.25).total_for_student(20) == 27  # 27 − round(6.75) = 20
    with pytest.raises(ValueError, match=r"needs at least 18 student epochs \(23 epochs in all\); asked for 4"):
        RIDSchedule().total_for_student(4)
    with pytest.raises(ValueError, match=r"no schedule has exactly 19 student epochs .* 24 epochs give 18, 25 give 20"):
        RIDSchedule(placement="paper").total_for_student(19)
    with pytest.raises(ValueError, match="student_positions must be ≥ 1"):
        RIDSchedule().total_for_student(0)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"n_rounds": 0}, ValueError, "n_rounds must be ≥ 1"),
        ({"n_rounds": 2.5}, TypeError, "n_rounds must be an int"),
        ({"filter_fraction": 1.0}, ValueError, "filter_fraction"),
        ({"filter_fraction": -0.1}, ValueError, "filter_fraction"),
        ({"filter_fraction": "0.2"}, TypeError, "filter_fraction must be a number"),
        ({"unit": "batch"}, ValueError, "unit"),
        ({"redundancy_from_round": -1}, ValueError, "redundancy_from_round must be ≥ 0"),
        ({"placement": "official"}, ValueError, "placement must be one of"),
    ],
)
def test_bad_schedule(kwargs, error, match):
    with pytest.raises(error, match=match):
        RIDSchedule(**kwargs)


def test_bad_schedule_positions():
    with pytest.raises(ValueError, match=r"position 25 outside \[0, 25\)"):
        RIDSchedule().phase(25, 25)
    with pytest.raises(TypeError, match="total must be an int"):
        RIDSchedule().phase(0, 25.0)


# ---- arguments and shapes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"estimator": "kl"}, ValueError, "estimator must be one of"),
        ({"num_classes": 0}, ValueError, "num_classes must be ≥ 2"),
        ({"num_classes": 3.0}, TypeError, "num_classes must be an int"),
        ({"alpha": -1}, ValueError, "alpha must be a finite number ≥ 0"),
        ({"alpha": float("nan")}, ValueError, "alpha must be a finite number ≥ 0"),
        ({"filter_hidden": 0}, ValueError, "filter_hidden must be ≥ 1"),
        ({"filter_channels": -2}, ValueError, "filter_channels must be ≥ 1"),
        ({"grid": 0}, ValueError, "grid must be ≥ 1"),
        ({"temperature": 0.0}, ValueError, "temperature must be a finite number > 0"),
        ({"min_variance": 0.0}, ValueError, "min_variance must be a finite number > 0"),
        ({"variant": "official"}, ValueError, "variant must be one of"),
        ({"variant": "paper", "estimator": "infonce"}, ValueError, "variant='paper' fixes estimator"),
        ({"variant": "paper", "filter_hidden": 8}, ValueError, "variant='paper' fixes filter_hidden"),
        ({"variant": "paper", "grid": 4}, ValueError, "variant='paper' fixes grid"),
        ({"variant": "paper", "min_variance": 0.1}, ValueError, "variant='paper' fixes min_variance"),
    ],
)
def test_bad_loss_arguments_name_the_argument(kwargs, error, match):
    arguments = {"num_classes": 3, **kwargs}
    with pytest.raises(error, match=match):
        RIDLoss([(4,)], [(4,)], **arguments)


def test_bad_layer_shapes():
    with pytest.raises(ValueError, match="same, non-zero number of layers"):
        RIDLoss([(4,)], [(4,), (5,)], 3)
    with pytest.raises(ValueError, match=r"entries must be \(C,\) or \(C, H, W\)"):
        RIDLoss([(4, 4)], [(4,)], 3)
    with pytest.raises(ValueError, match=r"teacher_shapes\[0\] extents must be ≥ 1"):
        RIDLoss([(0, 4, 4)], [(4,)], 3)


@pytest.mark.parametrize("estimator", ["gaussian", "infonce"])
def test_features_of_the_wrong_shape_or_batch_are_refused(estimator):
    rid = RIDLoss([(32,), (16, 4, 4)], [(8,), (4, 4, 4)], num_classes=3, estimator=estimator)
    teacher = [torch.randn(6, 32), torch.randn(6, 16, 4, 4)]
    student = [torch.randn(6, 8), torch.randn(6, 4, 4, 4)]
    labels = torch.randint(0, 3, (6,))
    with pytest.raises(ValueError, match=r"teacher_feats\[0\]: expected shape \(B, 32\) .* got \(6, 31\)"):
        rid.filter_phase_loss([torch.randn(6, 31), teacher[1]], student, labels, include_redundancy=True)
    with pytest.raises(ValueError, match=r"student_feats\[1\]: expected shape \(B, 4, 4, 4\) .* got \(6, 4, 8, 8\)"):
        rid.student_phase_loss(teacher, [student[0], torch.randn(6, 4, 8, 8)])
    with pytest.raises(ValueError, match=r"student_feats\[0\] has batch size 5 but teacher_feats\[0\] has 6"):
        rid.student_phase_loss(teacher, [torch.randn(5, 8), student[1]])
    with pytest.raises(ValueError, match=r"teacher_feats\[0\] is an empty batch \(0 rows\)"):
        rid.student_phase_loss([t[:0] for t in teacher], [s[:0] for s in student])
    with pytest.raises(ValueError, match=r"teacher_feats\[0\] has batch size 1: in training mode"):
        rid.student_phase_loss([t[:1] for t in teacher], [s[:1] for s in student])
    with pytest.raises(ValueError, match=r"teacher_feats: expected 2 layers .* got 1"):
        rid.student_phase_loss(teacher[:1], student)
    with pytest.raises(ValueError, match=r"labels: expected shape \(6,\)"):
        rid.filter_phase_loss(teacher, student, labels[:4], include_redundancy=False)
    with pytest.raises(TypeError, match="labels must hold integer class indices"):
        rid.filter_phase_loss(teacher, student, labels.float(), include_redundancy=False)
    for bad in (3, -1):
        with pytest.raises(ValueError, match=rf"labels must be class indices in \[0, 3\) \(num_classes\); got {bad}"):
            rid.filter_phase_loss(teacher, student, torch.tensor([0, 1, 2, bad, 0, 1]), include_redundancy=False)
    rid.filter_phase_loss(teacher, student, labels, include_redundancy=True)  # the right shapes pass


# ---- the paper's variant against the official arithmetic ------------------------------------------
#
# The official system, written out from the paper's equations and its code's architecture: per layer
# pair, teacher filter 1×1 conv (C_t → C_t) → BatchNorm (batch statistics) → ReLU → 1×1 conv
# (C_t → C_s); student filter the same with widths C_s → 2·C_s → C_s; head Flatten → ReLU → Linear
# over the full-resolution map; σ² = log(1 + e^ρ) + 1e-3 per channel.
#   filter phase:  Σ_k CE(head_k(tf_k), y) + [from the second round] Σ_k mean((sf_k − tf_k)² / σ²_k)
#   student phase: CE(student) + α Σ_k mean(log σ²_k + (sf_k − tf_k)² / σ²_k)
# (the official student phase writes σ⁴ where log σ² stands here: the one intended difference).


def _official_filter(x, conv1, bn_weight, bn_bias, conv2):
    h = F.batch_norm(F.conv2d(x, conv1), None, None, bn_weight, bn_bias, training=True, eps=1e-5)
    return F.conv2d(F.relu(h), conv2)


def _official_head(q, weight, bias):
    return F.linear(F.relu(q.flatten(1)), weight, bias)


def _official_variance(rho):
    return torch.log(1 + torch.exp(rho)).view(1, -1, 1, 1) + 1e-3


def _official_weights(teacher_shapes, student_shapes, num_classes, generator):
    def draw(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_()

    layers = []
    for (c_t, h, w), (c_s, _, _) in zip(teacher_shapes, student_shapes):
        layers.append(
            {
                "tf": [draw(c_t, c_t, 1, 1), draw(c_t), draw(c_t), draw(c_s, c_t, 1, 1)],
                "sf": [draw(2 * c_s, c_s, 1, 1), draw(2 * c_s), draw(2 * c_s), draw(c_s, 2 * c_s, 1, 1)],
                "head": [draw(num_classes, c_s * h * w), draw(num_classes)],
                "rho": draw(c_s),
            }
        )
    return layers


def _load_official(rid, layers):
    """The official weights into rid_fast's modules, position by position (a missing or extra layer,
    or a width that differs, fails here)."""
    with torch.no_grad():
        for pair, weights in zip(rid.pairs, layers):
            for module, values in ((pair.teacher_filter, weights["tf"]), (pair.student_filter, weights["sf"])):
                conv1, norm, relu, conv2 = module  # exactly four layers: nothing after the second conv
                assert isinstance(relu, torch.nn.ReLU)
                for target, value in zip((conv1.weight, norm.weight, norm.bias, conv2.weight), values):
                    target.copy_(value)
            flatten, relu, linear = pair.head
            assert isinstance(relu, torch.nn.ReLU)
            linear.weight.copy_(weights["head"][0])
            linear.bias.copy_(weights["head"][1])
            pair.redundancy.rho.copy_(weights["rho"])


@pytest.mark.parametrize("include_redundancy", [False, True])
def test_paper_variant_reproduces_the_official_arithmetic(include_redundancy):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    teacher_shapes, student_shapes, classes, batch, alpha = [(6, 5, 5), (8, 3, 3)], [(3, 5, 5), (4, 3, 3)], 4, 7, 2.5
    layers = _official_weights(teacher_shapes, student_shapes, classes, generator)
    rid = RIDLoss(teacher_shapes, student_shapes, classes, alpha=alpha, variant="paper").double()
    _load_official(rid, layers)
    teacher = [torch.randn(batch, *shape, generator=generator, dtype=torch.float64) for shape in teacher_shapes]
    student = [
        torch.randn(batch, *shape, generator=generator, dtype=torch.float64).requires_grad_()
        for shape in student_shapes
    ]
    labels = torch.randint(0, classes, (batch,), generator=generator)

    tf = [_official_filter(t, *w["tf"]) for t, w in zip(teacher, layers)]
    sf = [_official_filter(s, *w["sf"]) for s, w in zip(student, layers)]
    variances = [_official_variance(w["rho"]) for w in layers]

    # filter phase: the teacher filters and heads carry gradients, nothing else does
    ce = sum(F.cross_entropy(_official_head(q, *w["head"]), labels) for q, w in zip(tf, layers))
    red = sum(torch.mean((s.detach() - q) ** 2 / v.detach()) for s, q, v in zip(sf, tf, variances))
    official = ce + red if include_redundancy else ce
    losses, _ = rid.filter_phase_loss(teacher, student, labels, include_redundancy=include_redundancy)
    ours = sum(losses.values())
    torch.testing.assert_close(ours, official, rtol=1e-12, atol=1e-12)
    filter_weights = [p for w in layers for p in (*w["tf"], *w["head"])]
    expected = torch.autograd.grad(official, filter_weights)
    got = torch.autograd.grad(ours, rid.filter_parameters())
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)

    # student phase: the redundancy term, teacher side fixed; gradients for the student side and ρ
    tf_fixed = [q.detach() for q in tf]
    official = alpha * sum(torch.mean(torch.log(v) + (s - q) ** 2 / v) for s, q, v in zip(sf, tf_fixed, variances))
    losses, _ = rid.student_phase_loss(teacher, student)
    torch.testing.assert_close(losses["redundancy"], official, rtol=1e-12, atol=1e-12)
    student_side = [p for w in layers for p in (*w["sf"], w["rho"])]
    expected = torch.autograd.grad(official, [*student, *student_side])
    got = torch.autograd.grad(losses["redundancy"], [*student, *rid.student_side_parameters()])
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_paper_variant_starts_where_the_official_code_does():
    torch.manual_seed(0)
    rid = RIDLoss([(32, 8, 8)], [(16, 8, 8)], 10, variant="paper")
    pair = rid.pairs[0]
    assert torch.equal(pair.redundancy.rho, torch.full((16,), 5.0))  # σ² = softplus(5) + 1e-3
    conv1, _, _, conv2 = pair.teacher_filter
    assert conv1.weight.shape == (32, 32, 1, 1) and conv2.weight.shape == (16, 32, 1, 1)
    assert pair.student_filter[0].weight.shape == (32, 16, 1, 1)  # 2·C_s
    linear = pair.head[2]
    assert linear.weight.shape == (10, 16 * 8 * 8) and torch.equal(linear.bias, torch.zeros(10))
    for layer in (conv1, conv2, linear):  # Kaiming-uniform, fan-out, ReLU gain: U(±√(6 / fan_out))
        bound = math.sqrt(6.0 / (layer.weight.shape[0] * layer.weight[0, 0].numel()))
        assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.9 * bound
    # the default variant differs in each of the places the README lists
    default = RIDLoss([(32, 8, 8)], [(16, 8, 8)], 10).pairs[0]
    assert isinstance(default.teacher_filter[-1], torch.nn.BatchNorm2d) and default.head[1].in_features == 16 * 4 * 4


# ---- the contrastive estimators' process group (data-parallel training) ----------------------------


def test_rid_loss_gives_its_contrastive_estimators_the_group_and_gather():
    rid = RIDLoss([(6,), (5,)], [(4,), (3,)], 3, estimator="infonce", gather="all_gather")
    assert [(pair.redundancy.group, pair.redundancy.gather) for pair in rid.pairs] == [(None, "all_gather")] * 2
