import math

import pytest
import torch
from estimator_checks import correlated_pair

from rid_fast.mi import functional
from rid_fast.mi.critics import BilinearCritic
from rid_fast.mi.estimators import MINE


def _negatives_log_mean_exp(module, x, y):
    scores = module.critic.scores(x, y)
    off = ~torch.eye(*scores.shape, dtype=torch.bool)
    return torch.logsumexp(scores[off], 0) - math.log(int(off.sum()))


def test_value_is_dv():
    x, y = correlated_pair(20, 30, 5)
    module = MINE("cosine", temperature=0.5)
    torch.testing.assert_close(module(x, y), functional.dv(x, y, temperature=0.5, critic="cosine"))


def test_first_step_gradient_is_dv_gradient():
    # The average starts at the first batch's partition, so ∇Z / Z̄ = ∇Z / Z = ∇ log Z.
    x, y = correlated_pair(20, 30, 5)
    torch.manual_seed(0)
    mine = MINE(BilinearCritic(5, 5)).double()
    grad_mine = torch.autograd.grad(mine(x, y), mine.critic.project.weight)[0]
    x_ = x.clone()
    grad_dv = torch.autograd.grad(
        functional.dv(mine.critic.project(x_), y, temperature=1.0), mine.critic.project.weight
    )[0]
    torch.testing.assert_close(grad_mine, grad_dv)


def test_moving_average_corrects_the_gradient():
    x1, y1 = correlated_pair(20, 30, 5, seed=1)
    x2, y2 = correlated_pair(20, 30, 5, seed=2)
    torch.manual_seed(0)
    mine = MINE(BilinearCritic(5, 5), ema_decay=0.9).double()
    mine(x1, y1)
    log_z1 = _negatives_log_mean_exp(mine, x1, y1).detach()
    torch.testing.assert_close(mine.log_partition_ema, log_z1)

    surrogate = mine(x2, y2)
    log_z2 = _negatives_log_mean_exp(mine, x2, y2)
    average = 0.9 * log_z1.exp() + 0.1 * log_z2.detach().exp()
    torch.testing.assert_close(mine.log_partition_ema, average.log())
    # Gradient: ∇ mean s_ii − ∇Z / Z̄.
    positives = mine.critic.scores(x2, y2).diagonal().mean()
    expected = torch.autograd.grad(positives - log_z2.exp() / average, mine.critic.project.weight)[0]
    got = torch.autograd.grad(surrogate, mine.critic.project.weight)[0]
    torch.testing.assert_close(got, expected)


def test_eval_mode_leaves_state_alone():
    x, y = correlated_pair(10, 10, 3)
    mine = MINE().double().eval()
    mine(x, y)
    assert torch.isnan(mine.log_partition_ema)


def test_state_is_saved():
    mine = MINE()
    mine(*correlated_pair(8, 8, 3))
    assert "log_partition_ema" in mine.state_dict()
    restored = MINE()
    restored.load_state_dict(mine.state_dict())
    torch.testing.assert_close(restored.log_partition_ema, mine.log_partition_ema)


def test_bad_decay():
    with pytest.raises(ValueError, match="ema_decay"):
        MINE(ema_decay=1.0)
