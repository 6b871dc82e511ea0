"""The functional front-end: dispatch, gradcheck of every estimator end to end, and torch.compile."""

import pytest
import torch
from estimator_checks import EXP_TEMPERATURE, correlated_pair, inductor_vectors

from rid_fast.mi import functional
from rid_fast.ops.dispatch import resolve_impl

#: Gradcheck differentiates the value: SMILE's own gradient (JS's) is not the gradient of its
#: value, so SMILE is checked here with the gradient of the clipped DV; tests/test_smile.py
#: checks that the default gradient is JS's.
ESTIMATORS = {
    "infonce": {},
    "infonce_symmetric": {"symmetric": True},
    "nwj": {},
    "dv": {},
    "smile_clipped_dv": {"clip": 1.0, "gradient": "clipped_dv"},
    "js": {},
}


@pytest.mark.parametrize("critic", ["dot", "cosine"])
@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_gradcheck_float64(small_tiles, name, critic):
    """Gradients w.r.t. x, y and the temperature against finite differences."""
    x, y = correlated_pair(19, 19, 5)
    temperature = torch.tensor(EXP_TEMPERATURE, dtype=torch.float64)
    options = ESTIMATORS[name]
    estimator = name.split("_")[0]

    def f(a, b, t):
        return functional.mi_bound(a, b, estimator, temperature=t, critic=critic, impl="torch", **options)

    inputs = tuple(t.clone().requires_grad_() for t in (x, y, temperature))
    assert torch.autograd.gradcheck(f, inputs)


def test_auto_is_streaming_on_cpu():
    assert resolve_impl("auto", torch.device("cpu")) == "torch"


def test_mi_bound_dispatches_by_name():
    x, y = correlated_pair(16, 20, 4)
    for name in ("infonce", "nwj", "dv", "smile", "js"):
        torch.testing.assert_close(functional.mi_bound(x, y, name), getattr(functional, name)(x, y))


def test_learnable_temperature_receives_gradient():
    x, y = correlated_pair(16, 16, 4)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    functional.infonce(x, y, temperature=log_t.exp()).backward()
    assert log_t.grad is not None and torch.isfinite(log_t.grad)


def test_output_dtype_is_accumulation_dtype():
    x, y = correlated_pair(16, 16, 4)
    assert functional.dv(x.half(), y.half()).dtype == torch.float32
    assert functional.dv(x.bfloat16(), y.bfloat16()).dtype == torch.float32
    assert functional.dv(x, y).dtype == torch.float64


class _AllEstimators(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Linear(6, 6)

    def forward(self, x, y):
        q = self.encoder(x)
        return (
            functional.infonce(q, y, critic="cosine")
            + functional.infonce(q, y, symmetric=True)
            + functional.nwj(q, y, temperature=1.0)
            + functional.dv(q, y, temperature=1.0)
            + functional.smile(q, y, temperature=1.0)
            + functional.js(q, y, temperature=1.0)
        )


def test_compiles_with_fullgraph_on_cpu():
    """The custom ops keep a model using every estimator in one graph under torch.compile on a
    machine without a GPU; compiled values and gradients equal eager ones."""
    torch.manual_seed(0)
    model = _AllEstimators()
    x, y = torch.randn(24, 6), torch.randn(24, 6)
    eager = model(x, y)
    (eager_grad,) = torch.autograd.grad(eager, model.encoder.weight)
    with inductor_vectors():
        compiled = torch.compile(model, fullgraph=True)(x, y)
        (compiled_grad,) = torch.autograd.grad(compiled, model.encoder.weight)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-4, atol=1e-5)
