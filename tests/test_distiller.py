import warnings

import pytest
import torch

from rid_fast import Distiller
from rid_fast.distill.distiller import FeatureHooks
from rid_fast.distill.methods import METHODS, resolve_method
from rid_fast.train.models import CNN, MLP

LAYERS = {"student_layers": ["blocks.0", "blocks.1"], "teacher_layers": ["blocks.0", "blocks.1"]}


def _pair(kind):
    torch.manual_seed(0)
    if kind == "mlp":
        return MLP(64, [8, 8], 10), MLP(64, [32, 32], 10), (64,)
    return CNN((1, 8, 8), [4, 8], 10), CNN((1, 8, 8), [8, 16], 10), (64,)


ALL_METHODS = [*METHODS, "rid_gaussian", "rid_infonce", "rid_nwj", "rid_dv", "rid_smile", "rid_js", "rid_mine"]


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_runs_a_step_in_every_phase(kind, method):
    student, teacher, input_shape = _pair(kind)
    distiller = Distiller(student, teacher, method=method, num_classes=10, input_shape=input_shape, **LAYERS)
    x, y = torch.randn(16, 64), torch.randint(0, 10, (16,))
    distiller.fit_teacher_statistics(x)
    teacher_before = [p.clone() for p in teacher.parameters()]
    for phase in distiller.method.phases:
        params = distiller.parameters_for(phase)
        optimizer = torch.optim.SGD(params, lr=0.1) if params else None
        position = 0 if phase == "filter" else 24  # RID: round 0 starts with its filter phase
        out = distiller(x, y, position=position, total=25)
        assert distiller.phase(position, 25) == phase
        assert torch.isfinite(out["loss"])
        if optimizer is not None:
            optimizer.zero_grad()
            out["loss"].backward()
            optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, teacher.parameters()))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_student_phase_returns_every_part():
    student, teacher, shape = _pair("mlp")
    distiller = Distiller(
        student, teacher, method="rid_gaussian", num_classes=10, input_shape=shape, weight=2.0, **LAYERS
    )
    distiller.fit_teacher_statistics(torch.randn(64, 64))
    out = distiller(torch.randn(8, 64), torch.randint(0, 10, (8,)), position=24, total=25)
    assert {"loss", "ce", "redundancy", "redundancy/0", "redundancy/1", "logits"} <= set(out)
    torch.testing.assert_close(out["loss"], out["ce"] + out["redundancy"])


def test_hooks_are_cleared_between_steps():
    student, _, _ = _pair("mlp")
    hooks = FeatureHooks(student, ["blocks.0", "blocks.1"], "student")
    student(torch.randn(4, 64))
    first = hooks.collect()
    assert [f.shape for f in first] == [torch.Size([4, 8])] * 2
    with pytest.raises(KeyError):  # nothing left over from the previous step
        hooks.collect()
    hooks.remove()
    student(torch.randn(4, 64))
    with pytest.raises(KeyError):
        hooks.collect()


def test_train_mode_keeps_the_teacher_in_eval():
    student, teacher, shape = _pair("cnn")
    distiller = Distiller(student, teacher, method="vid", num_classes=10, input_shape=shape, **LAYERS)
    distiller.train()
    assert student.training and not teacher.training


def test_features_from_a_callable():
    student, teacher, shape = _pair("mlp")

    def features(model, x):
        h = model.blocks[0](x)
        return model.head(model.blocks[1](h)), [h]

    distiller = Distiller(student, teacher, method="fitnets", num_classes=10, input_shape=shape, features=features)
    distiller.fit_teacher_statistics(torch.randn(64, 64))
    assert torch.isfinite(distiller(torch.randn(8, 64), torch.randint(0, 10, (8,)))["loss"])


def test_teacher_standardisation_and_noise():
    student, teacher, shape = _pair("mlp")
    distiller = Distiller(
        student, teacher, method="vid", num_classes=10, input_shape=shape, teacher_noise_fraction=0.5, **LAYERS
    )
    inputs = torch.randn(256, 64)
    distiller.fit_teacher_statistics(inputs)
    _, feats = distiller.teacher_features(inputs)
    noisy = distiller.teacher_transform.noisy_0
    assert int(noisy.sum()) == 16  # half of 32 channels
    clean = feats[0][:, ~noisy]
    torch.testing.assert_close(clean.mean(0), torch.zeros(16), atol=1e-5, rtol=0)
    torch.testing.assert_close(clean.std(0), torch.ones(16), atol=1e-4, rtol=0)
    _, again = distiller.teacher_features(inputs)
    assert torch.equal(again[0][:, ~noisy], feats[0][:, ~noisy])
    assert not torch.equal(again[0][:, noisy], feats[0][:, noisy])  # fresh noise every step


def test_bad_arguments_name_what_is_wrong():
    student, teacher, shape = _pair("mlp")
    with pytest.raises(ValueError, match="teacher_layers: no module named"):
        Distiller(student, teacher, method="vid", num_classes=10, input_shape=shape,
                     student_layers=["blocks.0"], teacher_layers=["blocks.9"])  # fmt: skip
    with pytest.raises(ValueError, match="must pair up"):
        Distiller(student, teacher, method="vid", num_classes=10, input_shape=shape,
                     student_layers=["blocks.0"], teacher_layers=["blocks.0", "blocks.1"])  # fmt: skip
    with pytest.raises(ValueError, match=r"method 'kd' does not take option\(s\) \['estimator'\]"):
        Distiller(student, teacher, method="kd", num_classes=10, input_shape=shape, estimator="gaussian", **LAYERS)
    with pytest.raises(ValueError, match="unknown distillation method 'rid_kl'"):
        resolve_method("rid_kl")


def test_wrong_input_shape_is_named():
    student, teacher, _ = _pair("mlp")
    with pytest.raises(ValueError, match=r"input_shape=\(63,\): the student cannot run a batch of that shape"):
        Distiller(student, teacher, method="vid", num_classes=10, input_shape=(63,), **LAYERS)
    with pytest.raises(TypeError, match="input_shape must be a sequence of ints"):
        Distiller(student, teacher, method="vid", num_classes=10, input_shape=64, **LAYERS)
    with pytest.raises(ValueError, match="input_shape entries must be ≥ 1"):
        Distiller(student, teacher, method="vid", num_classes=10, input_shape=(0,), **LAYERS)
    distiller = Distiller(student, teacher, method="vid", num_classes=10, input_shape=(64,), **LAYERS)
    with pytest.raises(ValueError, match=r"x: expected shape \(B, 64\) as input_shape says; got \(8, 63\)"):
        distiller(torch.randn(8, 63), torch.randint(0, 10, (8,)))
    with pytest.raises(ValueError, match=r"y: expected shape \(8,\)"):
        distiller(torch.randn(8, 64), torch.randint(0, 10, (7,)))
    # A CNN that reshapes its input to one image accepts (3, 8, 8) for (1, 8, 8) by tripling the
    # batch: the features' batch gives it away.
    cnn_student, cnn_teacher = CNN((1, 8, 8), [8, 16], 10), CNN((1, 8, 8), [16, 32], 10)
    with pytest.raises(
        ValueError, match=r"the student turns a batch of 2 inputs of that shape into features of batch 6"
    ):
        Distiller(cnn_student, cnn_teacher, method="vid", num_classes=10, input_shape=(3, 8, 8), **LAYERS)


def test_phases_and_positions_are_checked():
    student, teacher, shape = _pair("mlp")
    distiller = Distiller(student, teacher, method="rid_gaussian", num_classes=10, input_shape=shape, **LAYERS)
    with pytest.raises(ValueError, match=r"phase must be one of 'filter', 'student' for RID; got 'teacher'"):
        distiller.parameters_for("teacher")
    with pytest.raises(ValueError, match=r"position must be in \[0, total\); got position=25, total=25"):
        distiller.phase(25, 25)
    with pytest.raises(ValueError, match="cannot give each of its 5 rounds a filter epoch and a student epoch in 10"):
        distiller.phase(0, 10)
    nokd = Distiller(student, teacher, method="nokd", num_classes=10, input_shape=shape, **LAYERS)
    with pytest.raises(ValueError, match="phase must be one of 'student' for NoKD; got 'filter'"):
        nokd.parameters_for("filter")


def test_bad_method_weights_are_named():
    student, teacher, shape = _pair("mlp")
    for method in ("kd", "fitnets", "vid", "crd", "rid_gaussian"):
        with pytest.raises(ValueError, match="weight must be a finite number ≥ 0; got -1"):
            Distiller(student, teacher, method=method, num_classes=10, input_shape=shape, weight=-1.0, **LAYERS)
    with pytest.raises(ValueError, match="num_classes must be ≥ 2"):
        Distiller(student, teacher, method="rid_gaussian", num_classes=0, input_shape=shape, **LAYERS)


def test_total_for_student_is_equal_student_steps_for_every_method():
    student, teacher, shape = _pair("mlp")
    totals = {}
    for method in ("nokd", "kd", "vid", "rid_gaussian", "rid_infonce"):
        distiller = Distiller(student, teacher, method=method, num_classes=10, input_shape=shape, **LAYERS)
        totals[method] = distiller.total_for_student(100)
        phases = [distiller.phase(p, totals[method]) for p in range(totals[method])]
        assert phases.count("student") == 100
        distiller.close()
    assert totals == {"nokd": 100, "kd": 100, "vid": 100, "rid_gaussian": 125, "rid_infonce": 125}
    rid = Distiller(student, teacher, method="rid_gaussian", num_classes=10, input_shape=shape, n_rounds=2,
                    filter_fraction=0.25, schedule_unit="step", **LAYERS)  # fmt: skip
    assert rid.total_for_student(24) == 32
    with pytest.raises(ValueError, match="needs at least"):
        Distiller(
            student, teacher, method="rid_gaussian", num_classes=10, input_shape=shape, **LAYERS
        ).total_for_student(4)


def test_forward_before_fitting_teacher_statistics_warns_once():
    student, teacher, shape = _pair("mlp")
    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
    distiller = Distiller(student, teacher, method="vid", num_classes=10, input_shape=shape, **LAYERS)
    with pytest.warns(UserWarning, match=r"never fitted .* call fit_teacher_statistics"):
        distiller(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        distiller(x, y)  # once per distiller
        fitted = Distiller(student, teacher, method="vid", num_classes=10, input_shape=shape, **LAYERS)
        fitted.fit_teacher_statistics(torch.randn(64, 64))
        fitted(x, y)
        raw = Distiller(student, teacher, method="vid", num_classes=10, input_shape=shape, standardize_teacher=False,
                        **LAYERS)  # fmt: skip
        raw(x, y)
        restored = Distiller(student, teacher, method="vid", num_classes=10, input_shape=shape, **LAYERS)
        restored.load_state_dict(fitted.state_dict())  # a saved distiller's statistics count as fitted
        restored(x, y)


def test_paper_variant_in_the_distiller():
    """The paper's system: raw teacher features, its schedule placement, and the student in training
    mode during the filter phase (its BatchNorm statistics move, as in the official code)."""
    x, y = torch.randn(16, 64), torch.randint(0, 10, (16,))
    for variant, standardized, moves in (("rid_fast", True, False), ("paper", False, True)):
        student, teacher, shape = _pair("cnn")
        distiller = Distiller(student, teacher, method="rid_gaussian", num_classes=10, input_shape=shape,
                              variant=variant, **LAYERS)  # fmt: skip
        assert distiller.teacher_transform.standardize is standardized
        assert distiller.method.schedule.placement == ("paper" if variant == "paper" else "even")
        assert distiller.method.loss.variant == variant
        distiller.train()
        before = student.blocks[0][1].running_mean.clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the default variant's unfitted statistics
            distiller(x, y, position=0, total=25)
        assert distiller.phase(0, 25) == "filter" and student.training
        assert (not torch.equal(before, student.blocks[0][1].running_mean)) is moves
    with pytest.raises(ValueError, match="variant='paper' fixes filter_hidden"):
        Distiller(student, teacher, method="rid_gaussian", num_classes=10, input_shape=shape, variant="paper",
                  filter_hidden=64, **LAYERS)  # fmt: skip
