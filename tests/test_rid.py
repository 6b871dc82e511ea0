import pytest
import torch

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


@pytest.mark.parametrize(
    "total,expected",
    [
        (10, "FSFSFSFSFS"),
        (25, "FSSSS" * 5),
        (23, "FSSSSFSSSSFSSSFSSSSFSSS"),  # rounds of 4.6 positions start at 0, 5, 10, 14, 19
    ],
)
def test_schedule_phase_boundaries(total, expected):
    schedule = RIDSchedule(n_rounds=5, filter_fraction=0.2)
    got = "".join(schedule.phase(p, total)[0].upper() for p in range(total))
    assert got == expected
    # every round starts with a filter phase and the filter share is as asked (up to rounding)
    assert abs(got.count("F") - 0.2 * total) <= 5


def test_redundancy_joins_the_filter_phase_after_the_first_round():
    schedule = RIDSchedule(n_rounds=4, filter_fraction=0.25)
    flags = [schedule.redundancy_in_filter_phase(p, 40) for p in range(40)]
    assert flags == [False] * 10 + [True] * 30
    assert all(RIDSchedule(4, 0.25, redundancy_from_round=0).redundancy_in_filter_phase(p, 40) for p in range(40))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"n_rounds": 0}, "n_rounds"),
        ({"filter_fraction": 1.0}, "filter_fraction"),
        ({"unit": "batch"}, "unit"),
    ],
)
def test_bad_schedule(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RIDSchedule(**kwargs)


def test_bad_loss_arguments():
    with pytest.raises(ValueError, match="estimator must be one of"):
        RIDLoss([(4,)], [(4,)], 3, estimator="kl")
    with pytest.raises(ValueError, match="same, non-zero number of layers"):
        RIDLoss([(4,)], [(4,), (5,)], 3)
    with pytest.raises(ValueError, match=r"entries must be \(C,\) or \(C, H, W\)"):
        RIDLoss([(4, 4)], [(4,)], 3)
