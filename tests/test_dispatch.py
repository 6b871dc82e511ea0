"""Bad input fails before any kernel runs, with an error naming the argument."""

import math
import re

import pytest
import torch

from rid_fast.mi import functional
from rid_fast.mi.critics import BilinearCritic, ConcatCritic, CosineCritic, DotCritic
from rid_fast.mi.estimators import DV, JS, MINE, NWJ, SMILE, InfoNCE

x8, y8 = torch.randn(8, 4), torch.randn(8, 4)
ALL = ["infonce", "nwj", "dv", "smile", "js"]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(
    "x,y,error,match",
    [
        (torch.randn(8), y8, ValueError, r"x must be a 2-D tensor"),
        (x8, torch.randn(2, 8, 4), ValueError, r"y must be a 2-D tensor"),
        (torch.randn(9, 4), y8, ValueError, r"N ≥ B.*B=9, N=8"),
        (x8, torch.randn(8, 5), ValueError, r"same number of features"),
        (x8, y8.double(), TypeError, r"same dtype"),
        (x8.int(), y8.int(), TypeError, r"x must have a floating-point dtype"),
        (x8, y8.long(), TypeError, r"y must have a floating-point dtype"),
        (torch.randn(0, 4), y8, ValueError, r"x is an empty batch"),
        (torch.randn(8, 0), torch.randn(8, 0), ValueError, r"x has 0 feature columns"),
        (x8.numpy(), y8, TypeError, r"x must be a torch.Tensor"),
        (torch.where(torch.arange(8)[:, None] == 3, math.nan, x8), y8, ValueError, r"x contains 4 non-finite"),
        (x8, torch.where(torch.arange(8)[:, None] == 3, math.inf, y8), ValueError, r"y contains 4 non-finite"),
    ],
)
def test_bad_tensors(name, x, y, error, match):
    with pytest.raises(error, match=match):
        functional.mi_bound(x, y, name)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(
    "temperature,error,match",
    [
        (0.0, ValueError, "temperature must be positive"),
        (-1.0, ValueError, "temperature must be positive"),
        (math.inf, ValueError, "temperature must be positive"),
        (torch.tensor(-0.5), ValueError, "temperature must be positive"),
        (torch.tensor([0.1, 0.2]), ValueError, "temperature tensor must hold one"),
        ("0.1", TypeError, "temperature must be a positive number"),
        (True, TypeError, "temperature must be a positive number"),
    ],
)
def test_bad_temperature(name, temperature, error, match):
    with pytest.raises(error, match=match):
        functional.mi_bound(x8, y8, name, temperature=temperature)


def test_bad_names():
    with pytest.raises(ValueError, match="critic must be one of 'dot', 'cosine'; got 'cos'"):
        functional.infonce(x8, y8, critic="cos")
    with pytest.raises(
        TypeError, match=r"got a CosineCritic module: .* rid_fast.estimators.InfoNCE\(CosineCritic"
    ) as error:
        functional.infonce(x8, y8, critic=CosineCritic(0.1))
    assert len(str(error.value).splitlines()) == 1
    with pytest.raises(ValueError, match="impl must be one of .*got 'cuda'"):
        functional.infonce(x8, y8, impl="cuda")
    with pytest.raises(ValueError, match="estimator must be one of .*got 'mi'"):
        functional.mi_bound(x8, y8, "mi")
    with pytest.raises(TypeError):
        functional.mi_bound(x8, y8, "dv", symmetric=True)  # not an option of DV


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="impl='triton' cannot run on cpu tensors"):
        functional.infonce(x8, y8, impl="triton")


@pytest.mark.parametrize("name", ["nwj", "dv", "smile", "js"])
def test_negatives_needed(name):
    one = torch.randn(1, 4)
    with pytest.raises(ValueError, match="needs N ≥ 2"):
        functional.mi_bound(one, one, name)


def test_symmetric_needs_square():
    with pytest.raises(ValueError, match="symmetric InfoNCE needs N = B"):
        functional.infonce(x8, torch.randn(9, 4), symmetric=True)


def test_bad_clip():
    with pytest.raises(ValueError, match="clip must be positive"):
        functional.smile(x8, y8, clip=0)
    with pytest.raises(TypeError, match="clip must be a positive number"):
        functional.smile(x8, y8, clip=None)


def test_values_check_can_be_skipped():
    bad = torch.where(torch.arange(8)[:, None] == 3, math.nan, x8)
    assert torch.isnan(functional.infonce(bad, y8, check_values=False))


def test_modules_validate_too():
    with pytest.raises(ValueError, match="N ≥ B"):
        InfoNCE()(torch.randn(9, 4), y8)
    with pytest.raises(ValueError, match="needs N ≥ 2"):
        MINE()(torch.randn(1, 4), torch.randn(1, 4))
    with pytest.raises(ValueError, match="critic must be one of"):
        InfoNCE("euclid")


ALL_MODULES = [InfoNCE, NWJ, DV, SMILE, JS, MINE]


@pytest.mark.parametrize("module_cls", ALL_MODULES)
@pytest.mark.parametrize("critic_cls", [BilinearCritic, ConcatCritic])
@pytest.mark.parametrize(
    "x_width,y_width,message",
    [
        (16, 9, "y must have 8 feature columns for {}(x_dim=16, y_dim=8): expected shape (N, 8); got shape (8, 9)"),
        (15, 8, "x must have 16 feature columns for {}(x_dim=16, y_dim=8): expected shape (B, 16); got shape (8, 15)"),
    ],
    ids=["y-too-wide", "x-too-narrow"],
)
def test_critic_with_its_own_widths_checks_them(module_cls, critic_cls, x_width, y_width, message):
    """A critic with weights takes (B, x_dim) and (N, y_dim): a wrong width is named before any
    product runs (it used to surface as torch's "mat1 and mat2 shapes cannot be multiplied")."""
    estimator = module_cls(critic_cls(16, 8))
    with pytest.raises(ValueError, match=re.escape(message.format(critic_cls.__name__))):
        estimator(torch.randn(8, x_width), torch.randn(8, y_width))


def test_front_door_checks_a_critic_module_too():
    with pytest.raises(ValueError, match=r"y must have 8 feature columns for BilinearCritic"):
        functional.estimate("infonce", torch.randn(8, 16), torch.randn(8, 9), BilinearCritic(16, 8))
    with pytest.raises(TypeError, match=r"critic must be a rid_fast.mi.critics.Critic .*got str"):
        functional.estimate("infonce", x8, y8, "dot")


@pytest.mark.parametrize("critic_cls", [BilinearCritic, ConcatCritic])
@pytest.mark.parametrize(
    "args,error,match",
    [
        ((0, 8), ValueError, r"x_dim must be a positive int; got 0"),
        ((16, -1), ValueError, r"y_dim must be a positive int; got -1"),
        ((16.0, 8), TypeError, r"x_dim must be a positive int; got 16.0"),
        ((True, 8), TypeError, r"x_dim must be a positive int; got True"),
    ],
)
def test_critic_widths_are_positive_ints(critic_cls, args, error, match):
    with pytest.raises(error, match=match):
        critic_cls(*args)


def test_concat_critic_hidden_width():
    with pytest.raises(ValueError, match=r"hidden must be a positive int; got 0"):
        ConcatCritic(16, 8, hidden=0)


@pytest.mark.parametrize("symmetric", ["yes", 1, None])
def test_symmetric_is_a_bool(symmetric):
    with pytest.raises(TypeError, match=rf"symmetric must be True or False; got {symmetric!r}"):
        functional.infonce(x8, y8, symmetric=symmetric)
    with pytest.raises(TypeError, match=rf"symmetric must be True or False; got {symmetric!r}"):
        InfoNCE(symmetric=symmetric)


def test_check_values_is_a_bool():
    with pytest.raises(TypeError, match=r"check_values must be True or False; got 'no'"):
        functional.infonce(x8, y8, check_values="no")
    with pytest.raises(TypeError, match=r"check_values must be True or False; got 'no'"):
        DV(check_values="no")


def test_modules_check_impl_when_built():
    with pytest.raises(ValueError, match=r"impl must be one of .*got 'cuda'"):
        InfoNCE(impl="cuda")


def test_temperature_of_a_critic_module_is_the_critics():
    """A temperature passed beside a critic module used to be dropped silently."""
    with pytest.raises(ValueError, match=r"temperature applies to a critic given by name.*BilinearCritic"):
        InfoNCE(BilinearCritic(16, 8), temperature=0.5)
    assert float(InfoNCE("dot", temperature=0.5).critic.temperature) == pytest.approx(0.5)
    assert float(InfoNCE("dot").critic.temperature) == pytest.approx(0.1)


def test_smile_gradient_is_a_known_choice():
    with pytest.raises(ValueError, match=r"gradient must be one of 'js', 'clipped_dv'; got 'dv'"):
        functional.smile(x8, y8, gradient="dv")
    with pytest.raises(ValueError, match=r"gradient must be one of 'js', 'clipped_dv'; got 'dv'"):
        SMILE(gradient="dv")
    with pytest.raises(ValueError, match=r"clip must be positive"):
        SMILE(DotCritic(), clip=-1.0)
