import pytest
import torch
from estimator_checks import correlated_pair

from rid_fast.mi import reference
from rid_fast.mi.critics import BilinearCritic, ConcatCritic, CosineCritic, DotCritic
from rid_fast.mi.estimators import DV, JS, NWJ, SMILE, InfoNCE


@pytest.mark.parametrize("critic_cls,name", [(DotCritic, "dot"), (CosineCritic, "cosine")])
def test_named_critics_match_reference_scores(critic_cls, name):
    x, y = correlated_pair(7, 9, 5)
    critic = critic_cls(temperature=0.3).double()
    torch.testing.assert_close(critic(x, y), reference.critic_scores(x, y, temperature=0.3, critic=name))


def test_fixed_temperature_is_a_buffer_learnable_is_a_parameter():
    fixed, learnable = DotCritic(0.2), DotCritic(0.2, learnable=True)
    assert "log_temperature" in dict(fixed.named_buffers()) and not list(fixed.parameters())
    assert [n for n, _ in learnable.named_parameters()] == ["log_temperature"]
    assert float(learnable.temperature.detach()) == pytest.approx(0.2)


def test_learnable_temperature_trains():
    x, y = correlated_pair(32, 32, 4)
    critic = CosineCritic(1.0, learnable=True).double()
    InfoNCE(critic)(x, y).backward()
    assert critic.log_temperature.grad is not None and float(critic.log_temperature.grad) != 0


def test_bilinear_is_a_projection_then_dot():
    torch.manual_seed(0)
    critic = BilinearCritic(5, 3, temperature=0.5).double()
    x, y = correlated_pair(6, 6, 5)[0], correlated_pair(6, 6, 3)[1]
    expected = x @ critic.project.weight.T @ y.T / 0.5  # x W yᵀ / τ with W = weightᵀ (5 × 3)
    torch.testing.assert_close(critic(x, y), expected)


def test_concat_critic_scores_every_pair():
    torch.manual_seed(0)
    critic = ConcatCritic(4, 3, hidden=8).double()
    x, y = correlated_pair(5, 6, 4)[0], correlated_pair(6, 6, 3)[1]
    scores = critic(x, y)
    for i in range(5):
        for j in range(6):
            h = torch.relu(critic.x_in(x[i]) + critic.y_in(y[j]))
            torch.testing.assert_close(scores[i, j], critic.out(h).squeeze())


@pytest.mark.parametrize("estimator_cls", [InfoNCE, NWJ, DV, SMILE, JS])
def test_bilinear_fast_path_matches_reference(small_tiles, estimator_cls):
    """Values and parameter gradients of a module with a learnable critic, fast vs reference."""
    x, y = correlated_pair(37, 56, 7)[0], correlated_pair(56, 56, 4)[1]
    results = []
    for impl in ("torch", "reference"):
        torch.manual_seed(0)
        module = estimator_cls(BilinearCritic(7, 4, learnable_temperature=True), impl=impl).double()
        value = module(x, y)
        grads = torch.autograd.grad(value, list(module.parameters()))
        results.append((value, grads))
    (v_fast, g_fast), (v_ref, g_ref) = results
    torch.testing.assert_close(v_fast, v_ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_concat_critic_trains_through_estimator():
    torch.manual_seed(0)
    module = DV(ConcatCritic(4, 4, hidden=8)).double()
    x, y = correlated_pair(10, 10, 4)
    module(x, y).backward()
    assert all(p.grad is not None for p in module.parameters())


def test_bad_critic_temperature():
    with pytest.raises(ValueError, match="temperature"):
        DotCritic(0.0)
