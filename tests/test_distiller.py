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
    teacher_before = [p.clone() for p in teacher.parameters()]
    for phase in distiller.method.phases:
        params = distiller.parameters_for(phase)
        optimizer = torch.optim.SGD(params, lr=0.1) if params else None
        position = 0 if phase == "filter" else 9  # RID: round 0 starts with its filter phase
        out = distiller(x, y, position=position, total=10)
        assert distiller.phase(position, 10) == phase
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
    out = distiller(torch.randn(8, 64), torch.randint(0, 10, (8,)), position=9, total=10)
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
