"""The pairwise-MLP (concat) critic's fused reductions: the C++ kernel (``"cpp"``) and the blocked
PyTorch path (``"torch"``) against the materialising oracle (:mod:`rid_fast.ops.pairwise_reference`),
values and gradients of a, c, w2, b2, op by op and through every estimator (A, C, b1, w2, b2 of a
ConcatCritic); bad inputs; determinism of the C++ kernel; the fallback when it cannot be built;
memory; torch.compile.

Accuracy (as ``estimator_checks``): in float64 every output is within 1e-9 relative of the oracle.
In float32 each output's error against a float64 truth (the oracle on the same fp32 inputs,
upcast) is at most twice the fp32 oracle's own error, or within torch.testing's default fp32
tolerance; dw2 and db2 sum over all B·N pairs, and the error of such a sum depends on the order of
its additions, so for them the bound may also reach the first-order, order-free bound of
:func:`all_pairs_bound`.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from estimator_checks import DEFAULT_TOLERANCES, FP32_UNIT_ROUNDOFF, NARROWEST_TILE, LargestTensor, inductor_vectors

from rid_fast import cli
from rid_fast.mi.critics import ConcatCritic
from rid_fast.mi.estimators import DV, JS, MINE, NWJ, SMILE, InfoNCE
from rid_fast.ops import library, pairwise_cpp, pairwise_reference, pairwise_streaming
from rid_fast.ops.dispatch import pairwise_status, resolve_pairwise_impl

BACKENDS = ("torch", "cpp")
FP32, FP64 = torch.float32, torch.float64

#: label → (op, options, the op as a function of the (B, N) scores: what its weights are taken from).
OPS = {
    "cross_entropy_rows": ("cross_entropy_rows", {}),
    "cross_entropy_rows_cols": ("cross_entropy_rows_cols", {}),
    "lse_negatives": ("lse_negatives", {"clip": None}),
    "lse_negatives_clip": ("lse_negatives", {"clip": 0.5}),
    "softplus_negatives": ("softplus_negatives", {}),
}


def _masked_diagonal(scores: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask[:, : scores.shape[0]].fill_diagonal_(True)
    return scores.masked_fill(mask, -math.inf)


def _from_scores(label: str, scores: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The op's outputs from materialised scores (for the weights of the error bound)."""
    diagonal = scores[:, : scores.shape[0]].diagonal()
    if label == "cross_entropy_rows":
        return (torch.logsumexp(scores, 1) - diagonal,)
    if label == "cross_entropy_rows_cols":
        return torch.logsumexp(scores, 1) - diagonal, torch.logsumexp(scores, 0) - diagonal
    if label == "softplus_negatives":
        return (F.softplus(_masked_diagonal(scores)).sum(1),)
    clip = OPS[label][1].get("clip")
    return (torch.logsumexp(_masked_diagonal(scores if clip is None else scores.clamp(-clip, clip)), 1),)


def _inputs(n_queries: int, n_keys: int, hidden: int, *, seed: int = 0):
    """a (B, H), c (N, H), w2 (H,), b2 () in float64, with scores of order one (|s| up to ~3)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n_queries, hidden, generator=gen, dtype=FP64)
    c = torch.randn(n_keys, hidden, generator=gen, dtype=FP64)
    w2 = 1.5 * torch.randn(hidden, generator=gen, dtype=FP64) / math.sqrt(hidden)
    return a, c, w2, torch.tensor(0.3, dtype=FP64)


def _incoming(label: str, n_queries: int, n_keys: int):
    """Incoming gradients of the op's outputs (fixed, of both signs)."""
    gen = torch.Generator().manual_seed(1)
    lengths = (n_queries, n_keys) if label == "cross_entropy_rows_cols" else (n_queries,)
    return tuple(torch.randn(n, generator=gen, dtype=FP64) for n in lengths)


def run(label: str, backend: str, factors, grads):
    """(outputs, (da, dc, dw2, db2)) of op ``label`` on ``backend`` (``"reference"``: the oracle) for
    the loss Σ grads · outputs."""
    name, options = OPS[label]
    inputs = [t.detach().clone().requires_grad_(True) for t in factors]
    if backend == "reference":
        outputs = getattr(pairwise_reference, name)(*inputs, **options)
    else:
        outputs = getattr(library, f"pairwise_{name}")(*inputs, *options.values(), backend)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    loss = sum((out * g.to(out.dtype)).sum() for out, g in zip(outputs, grads))
    gradients = torch.autograd.grad(loss, inputs)
    return tuple(o.detach().double() for o in outputs), tuple(g.double() for g in gradients)


def all_pairs_bound(label: str, factors, grads) -> tuple[torch.Tensor, float]:
    r"""First-order bounds on the fp32 rounding error of dw2 (H,) and db2, valid for every order of
    summation (float64 inputs, the fp32 values upcast).

    Each score is a sum of H + 1 terms formed from a_ih + c_jh, so it carries an absolute error of
    at most :math:`(H + 2)\,u\,\sigma_{ij}`, :math:`\sigma_{ij} = \sum_h |w_h||a_{ih} + c_{jh}| + |b_2|`
    (the worst case for any order of the additions, as ``estimator_checks`` bounds dot products); a
    weight :math:`W_{ij}` (a softmax, partition or sigmoid weight times the incoming gradient)
    formed from it and from a row (column)
    statistic of size at most :math:`L = \max|s| + \log N` carries a relative error of
    :math:`\kappa_{ij} u = ((H + 2)\,\sigma_{ij} + |s_{ij}| + L + 1) u`; the B·N products
    :math:`W_{ij} r_{ijh}` are added with at most m = ⌈log₂ BN⌉ + ⌈N/16⌉ roundings each (tree
    reductions plus sequential tiles at least 16 wide). Hence
    :math:`|\widehat{dw}_h - dw_h| \le u \sum_{ij} (\kappa_{ij} + m + 1) |W_{ij}| r_{ijh}`, and
    the same without r for db2. The errors seen (C++ kernel, blocked path and fp32 oracle alike) are
    far below it; a missing tile or a wrong factor still fails — and every algorithmic error fails
    the float64 comparison at 1e-9.
    """
    a, c, w2, b2 = factors
    n_queries, n_keys, hidden = a.shape[0], c.shape[0], a.shape[1]
    pre = a[:, None, :] + c[None, :, :]  # (B, N, H)
    scores = (torch.relu(pre) @ w2 + b2).requires_grad_(True)
    outputs = _from_scores(label, scores)
    (weights,) = torch.autograd.grad(sum((o * g).sum() for o, g in zip(outputs, grads)), scores)
    weights = weights.abs()
    if label.startswith("cross_entropy"):  # the exact −δ_ij term apart from the softmax weight it cancels
        weights[:, :n_queries].diagonal().add_(sum(g.abs()[:n_queries] for g in grads))
    sigma = (pre.abs() * w2.abs()).sum(-1) + b2.abs()
    statistic = scores.detach().abs().max() + math.log(n_keys)
    roundings = math.ceil(math.log2(max(n_queries * n_keys, 2))) + math.ceil(n_keys / NARROWEST_TILE)
    kappa = (hidden + 2) * sigma + scores.detach().abs() + statistic + 2 + roundings
    components = kappa * weights
    dw2 = FP32_UNIT_ROUNDOFF * torch.einsum("ij,ijh->h", components, torch.relu(pre))
    return dw2, FP32_UNIT_ROUNDOFF * float(components.sum())


def _shapes(label: str):
    for n_queries in (1, 37, 130):
        for n_keys in (n_queries, n_queries + 19):
            if label == "cross_entropy_rows_cols" and n_keys != n_queries:
                continue
            if "negatives" in label and n_keys < 2:
                continue
            for hidden in (3, 17, 64, 130):
                yield n_queries, n_keys, hidden


def small_blocks(monkeypatch, hidden: int) -> None:
    """Hidden blocks of 96·H elements: tiles of 96 columns (one row) when N > 96, of several whole
    rows below, so the odd shapes span ragged tiles of rows or of columns."""
    monkeypatch.setattr(pairwise_streaming, "BLOCK_ELEMENTS", 96 * hidden)


_TRUTH: dict = {}


def _truth_and_reference(label, shape, dtype):
    """The float64 truth on the inputs rounded to ``dtype``, and the oracle in ``dtype`` (cached: the
    backends share them)."""
    key = (label, shape, dtype)
    if key not in _TRUTH:
        factors = tuple(t.to(dtype) for t in _inputs(*shape))
        grads = _incoming(label, *shape[:2])
        truth = run(label, "reference", tuple(t.double() for t in factors), grads)
        reference = run(label, "reference", factors, grads) if dtype != FP64 else None
        _TRUTH[key] = factors, grads, truth, reference
    return _TRUTH[key]


def _error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs()


@pytest.mark.parametrize("dtype", (FP32, FP64), ids=("fp32", "fp64"))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("label,shape", [(label, shape) for label in OPS for shape in _shapes(label)])
def test_op_matches_reference(monkeypatch, label, shape, backend, dtype):
    small_blocks(monkeypatch, shape[2])
    factors, grads, (truth_out, truth_grads), reference = _truth_and_reference(label, shape, dtype)
    got_out, got_grads = run(label, backend, factors, grads)
    names = [f"output {k}" for k in range(len(truth_out))] + ["da", "dc", "dw2", "db2"]
    got, truth = (*got_out, *got_grads), (*truth_out, *truth_grads)
    for t_got, t_truth in zip(got, truth):
        assert t_got.shape == t_truth.shape
    if dtype == FP64:
        for name, t_got, t_truth in zip(names, got, truth):
            bound = 1e-9 * max(1.0, float(t_truth.abs().max()))
            assert float(_error(t_got, t_truth).max()) <= bound, f"{label} {name}: float64 error"
        return
    rtol, atol = DEFAULT_TOLERANCES[dtype]
    dw2_bound, db2_bound = all_pairs_bound(label, tuple(t.double() for t in factors), grads)
    order_free = {"dw2": dw2_bound, "db2": db2_bound}
    for name, t_got, t_truth, t_ref in zip(names, got, truth, (*reference[0], *reference[1])):
        scale = float(t_truth.abs().max())
        bound = max(2 * float(_error(t_ref, t_truth).max()), atol + rtol * scale)
        error = _error(t_got, t_truth)
        allowed = torch.clamp(torch.as_tensor(order_free.get(name, 0.0), dtype=FP64), min=bound)
        assert bool((error <= allowed).all()), (
            f"{label} {name} ({backend}): error {float(error.max()):.3g} > bound {float(allowed.max()):.3g}"
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("label", OPS)
def test_op_gradcheck(monkeypatch, label, backend):
    monkeypatch.setattr(pairwise_streaming, "BLOCK_ELEMENTS", 2 * 4)  # tiles of one row × 2 columns
    name, options = OPS[label]
    factors = tuple(t.requires_grad_(True) for t in _inputs(3, 3 if label == "cross_entropy_rows_cols" else 5, 4))
    op = getattr(library, f"pairwise_{name}")
    assert torch.autograd.gradcheck(lambda *t: op(*t, *options.values(), backend), factors)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("label", OPS)
def test_op_passes_opcheck(label, backend):
    """Schema, fake implementation and autograd registration agree with the real op."""
    name, options = OPS[label]
    factors = [t.float().requires_grad_(True) for t in _inputs(3, 3 if label == "cross_entropy_rows_cols" else 5, 4)]
    op = getattr(torch.ops.rid_fast, f"pairwise_{name}").default
    torch.library.opcheck(op, (*factors, *options.values(), backend))


# ---- through the estimators ---------------------------------------------------------------------

#: label → (module class, options, (B, N, H) shapes; B = 1 where the estimator allows it).
ESTIMATORS = {
    "infonce": (InfoNCE, {}, [(1, 1, 3), (37, 56, 17), (130, 130, 64)]),
    "infonce_symmetric": (InfoNCE, {"symmetric": True}, [(1, 1, 3), (37, 37, 130)]),
    "nwj": (NWJ, {}, [(1, 20, 3), (37, 56, 64)]),
    "dv": (DV, {}, [(1, 2, 17), (37, 56, 130)]),
    "smile": (SMILE, {"clip": 1.0}, [(1, 20, 3), (37, 56, 64)]),
    "smile_clipped_dv": (SMILE, {"clip": 1.0, "gradient": "clipped_dv"}, [(37, 56, 17)]),
    "js": (JS, {}, [(1, 20, 17), (37, 56, 64)]),
    "mine": (MINE, {}, [(37, 56, 17)]),
}


def _module_result(label, shape, impl):
    """Value and gradients (x, y, then A, b1, C, w2, b2) of the estimator module, float64."""
    module_cls, options, _ = ESTIMATORS[label]
    n_queries, n_keys, hidden = shape
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(n_queries, 5, generator=gen, dtype=FP64, requires_grad=True)
    y = torch.randn(n_keys, 3, generator=gen, dtype=FP64, requires_grad=True)
    torch.manual_seed(0)
    module = module_cls(ConcatCritic(5, 3, hidden=hidden), impl=impl, **options).double()
    value = module(x, y)
    return value.detach(), torch.autograd.grad(value, (x, y, *module.parameters()))


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize(
    "label,shape", [(label, shape) for label, (_, _, shapes) in ESTIMATORS.items() for shape in shapes]
)
def test_estimator_matches_reference(monkeypatch, label, shape, impl):
    small_blocks(monkeypatch, shape[2])
    value, grads = _module_result(label, shape, impl)
    want_value, want_grads = _module_result(label, shape, "reference")
    names = ["value", "x", "y", "A", "b1", "C", "w2", "b2"]
    for name, got, want in zip(names, (value, *grads), (want_value, *want_grads)):
        bound = 1e-9 * max(1.0, float(want.abs().max()))
        assert float((got - want).abs().max()) <= bound, f"{label} {name} ({impl})"


@pytest.mark.parametrize("impl", BACKENDS)
def test_auto_runs_the_kernel_or_the_blocked_path(impl, monkeypatch):
    """``impl="auto"`` on CPU tensors is the C++ kernel when it is built; the same numbers either way."""
    assert resolve_pairwise_impl("auto", torch.device("cpu"), FP32) == pairwise_status("cpu")[0]
    value, grads = _module_result("dv", (37, 56, 17), "auto")
    want_value, want_grads = _module_result("dv", (37, 56, 17), impl)
    for got, want in zip((value, *grads), (want_value, *want_grads)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# ---- bad input ----------------------------------------------------------------------------------


def _ok():
    return torch.randn(4, 6), torch.randn(5, 6), torch.randn(6), torch.randn(())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "change,error,match",
    [
        ({"c": torch.randn(5, 7)}, ValueError, r"c must have a's hidden width H = 6; got c with H = 7"),
        ({"w2": torch.randn(5)}, ValueError, r"w2 must have a's hidden width H = 6; got w2 with H = 5"),
        ({"a": torch.randn(4)}, ValueError, r"a must have shape \(B, H\) \(2-D\); got shape \(4,\)"),
        ({"w2": torch.randn(6, 1)}, ValueError, r"w2 must have shape \(H,\) \(1-D\); got shape \(6, 1\)"),
        ({"b2": torch.randn(1)}, ValueError, r"b2 must have shape \(\) \(0-D\); got shape \(1,\)"),
        ({"c": torch.randn(5, 6, dtype=FP64)}, TypeError, r"one dtype; got a torch.float32, c torch.float64"),
        ({"c": torch.randn(5, 6, device="meta")}, ValueError, r"one device; got a on cpu, c on meta"),
        ({"a": torch.ones(4, 6, dtype=torch.int64)}, TypeError, r"a must have a floating-point dtype"),
        ({"c": torch.randn(3, 6)}, ValueError, r"c must have at least as many rows as a \(N ≥ B\); got B=4, N=3"),
    ],
)
def test_bad_factors_are_named(backend, change, error, match):
    factors = dict(zip(("a", "c", "w2", "b2"), _ok()), **change)
    with pytest.raises(error, match=match):
        library.pairwise_lse_negatives(*factors.values(), None, backend)


def test_op_specific_shapes_are_checked():
    a, c, w2, b2 = _ok()
    with pytest.raises(ValueError, match=r"cross_entropy_rows_cols needs N = B; got B=4, N=5"):
        library.pairwise_cross_entropy_rows_cols(a, c, w2, b2, "cpp")
    with pytest.raises(ValueError, match=r"softplus_negatives .* needs N ≥ 2; got N=1"):
        library.pairwise_softplus_negatives(a[:1], c[:1], w2, b2, "torch")
    with pytest.raises(ValueError, match=r"backend must be 'torch', 'cpp' or 'triton'; got 'cuda'"):
        library.pairwise_cross_entropy_rows(a, c, w2, b2, "cuda")


def test_cpp_is_the_concat_critics_impl_only():
    x, y = torch.randn(8, 4), torch.randn(8, 4)
    with pytest.raises(ValueError, match=r"impl='cpp' is the pairwise-MLP critic's \(ConcatCritic's\) C\+\+ kernel"):
        InfoNCE("dot", impl="cpp")(x, y)
    with pytest.raises(ValueError, match=r"impl='cpp' runs on CPU tensors; got meta tensors"):
        resolve_pairwise_impl("cpp", torch.device("meta"))


# ---- the C++ kernel: determinism, fallback -------------------------------------------------------


def _kernel_results(label: str, shape):
    factors = tuple(t.float() for t in _inputs(*shape))
    return run(label, "cpp", factors, _incoming(label, *shape[:2]))


@pytest.mark.parametrize("label", ["cross_entropy_rows_cols", "lse_negatives_clip", "softplus_negatives"])
def test_kernel_is_bitwise_reproducible_for_any_number_of_threads(label):
    """Tiles of a fixed size, each output written by the one thread owning its tile, partials added
    in tile order: the same bits run after run and for 1, 2 or 3 threads."""
    shape = (130, 130, 64) if label == "cross_entropy_rows_cols" else (130, 149, 64)
    threads = torch.get_num_threads()
    try:
        results = []
        for n_threads in (1, 2, 3, 2):
            torch.set_num_threads(n_threads)
            results.append(_kernel_results(label, shape))
    finally:
        torch.set_num_threads(threads)
    first = [t for part in results[0] for t in part]
    for other in results[1:]:
        for t_first, t_other in zip(first, [t for part in other for t in part]):
            assert torch.equal(t_first, t_other)


@pytest.mark.parametrize("dtype", (FP32, FP64), ids=("fp32", "fp64"))
def test_kernel_scores_a_pair_the_same_wherever_it_lies(dtype):
    """Every pass (forward statistics, backward sweep) scores tiles in register blocks of several
    pairs, each pair's H-sum in one fixed order: s_ii taken from the forward's tiles (inside blocks,
    on ragged edges) equals, bit for bit, s_ii scored alone."""
    ext = pairwise_cpp.load()
    prepared = pairwise_cpp._prepare(*(t.to(dtype) for t in _inputs(37, 56, 40)))
    _, tiled = ext.row_statistics(*prepared, 0, math.nan)
    assert torch.equal(tiled, ext.diagonal(*prepared))


def _env_output(capsys) -> str:
    assert cli.main(["env"]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize(
    "environment,reason",
    [
        ({"CXX": "/nonexistent/c++"}, "no C++ compiler ('/nonexistent/c++' is not on PATH; set CXX)"),
        ({"RID_FAST_PAIRWISE_CPP": "0"}, "switched off (RID_FAST_PAIRWISE_CPP=0)"),
        ({"CXX": "false"}, "the build failed"),
    ],
    ids=["no-compiler", "switched-off", "build-fails"],
)
def test_without_the_kernel_the_blocked_path_runs_and_env_says_why(monkeypatch, capsys, tmp_path, environment, reason):
    monkeypatch.setattr(pairwise_cpp, "_STATE", None)  # forget this process's build; restored afterwards
    monkeypatch.setenv("RID_FAST_CACHE", str(tmp_path))  # a failing build must not touch the real cache
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    available, why = pairwise_cpp.status()
    assert not available and why.startswith(reason)
    building = "rid_fast: building the pairwise-critic C++ kernel (first use, about a minute)"
    assert (building in capsys.readouterr().err) == (reason == "the build failed")  # said before compiling
    assert resolve_pairwise_impl("auto", torch.device("cpu"), FP32) == "torch"
    with pytest.raises(ValueError, match=r"impl='cpp' cannot run: C\+\+ kernel unavailable: "):
        _module_result("dv", (7, 9, 5), "cpp")
    value, _ = _module_result("dv", (7, 9, 5), "auto")
    torch.testing.assert_close(value, _module_result("dv", (7, 9, 5), "torch")[0], rtol=0, atol=0)
    output = _env_output(capsys)
    line = next(line for line in output.splitlines() if line.startswith("pairwise-MLP critic"))
    assert "torch (blocked PyTorch)" in line and reason in line


def test_env_names_the_kernel_when_it_is_built(capsys):
    line = next(line for line in _env_output(capsys).splitlines() if line.startswith("pairwise-MLP critic"))
    if pairwise_cpp.available():
        assert "cpp (C++ kernel)" in line and str(pairwise_cpp.cache_dir()) in line
        assert "loaded from the cache" in line or "built now" in line
    else:
        assert "torch (blocked PyTorch)" in line


def test_build_name_changes_with_the_source_and_flags(monkeypatch):
    name = pairwise_cpp.build_name()
    monkeypatch.setenv("RID_FAST_PAIRWISE_MARCH", "portable")
    assert pairwise_cpp.build_name() != name and pairwise_cpp.build_name().startswith("rid_fast_pairwise_")


# ---- memory -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("label", OPS)
def test_ops_never_hold_the_scores_nor_the_hidden_layer(monkeypatch, backend, label):
    """Every tensor the backend creates, forward and backward, is O((B + N)·H) (plus one hidden block
    on the blocked path, here 4 rows; the C++ kernel's backward keeps up to GROUPS partials of da and
    of dc), never B·N (40000) nor B·N·H."""
    block = 4 * 200 * 16
    monkeypatch.setattr(pairwise_streaming, "BLOCK_ELEMENTS", block)
    module = pairwise_cpp if backend == "cpp" else pairwise_streaming
    name, options = OPS[label]
    a, c, w2, b2 = (t.float() for t in _inputs(200, 200, 16))
    with LargestTensor() as mode:
        outputs = getattr(module, f"{name}_forward")(a, c, w2, b2, *options.values())
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        saved = () if name == "softplus_negatives" else outputs
        grads = tuple(torch.ones_like(o) for o in outputs)
        getattr(module, f"{name}_backward")(*grads, a, c, w2, b2, *saved, *options.values())
    limit = pairwise_cpp.load().GROUPS * 200 * 16 if backend == "cpp" else max(block, 2 * (200 + 200) * 16)
    assert mode.largest <= limit, f"a tensor of {mode.largest} elements (B·N = 40000, B·N·H = 640000)"


@pytest.mark.parametrize("impl", BACKENDS)
def test_estimator_never_holds_the_scores(monkeypatch, impl):
    monkeypatch.setattr(pairwise_streaming, "BLOCK_ELEMENTS", 4 * 300 * 16)
    critic = ConcatCritic(8, 8, hidden=16)
    x, y = torch.randn(300, 8, requires_grad=True), torch.randn(300, 8, requires_grad=True)
    with LargestTensor() as mode:
        DV(critic, impl=impl)(x, y).backward()
    assert mode.largest <= 4 * 300 * 16, f"a tensor of {mode.largest} elements (B·N = 90000)"


# ---- torch.compile ---------------------------------------------------------------------------------


class _ConcatEstimators(torch.nn.Module):
    def __init__(self, impl: str):
        super().__init__()
        self.encoder = torch.nn.Linear(6, 6)
        critic = ConcatCritic(6, 6, hidden=8)
        # Every pairwise op, forward and backward: row cross-entropy (InfoNCE), row and column
        # (symmetric), off-diagonal log-sum-exp (DV; NWJ's too), clipped without autograd and
        # softplus sums with it (SMILE, whose gradient is JS's).
        self.estimators = torch.nn.ModuleList(
            [
                InfoNCE(critic, impl=impl),
                InfoNCE(critic, symmetric=True, impl=impl),
                DV(critic, impl=impl),
                SMILE(critic, impl=impl),
            ]
        )

    def forward(self, x, y):
        q = self.encoder(x)
        return sum(estimator(q, y) for estimator in self.estimators)


def test_compiles_with_fullgraph_on_cpu():
    """The pairwise ops keep a model using every one of them through the estimators with a
    ConcatCritic in one graph under torch.compile on the CPU (the C++ kernel where it is built);
    compiled values and gradients equal eager ones."""
    torch.manual_seed(0)
    model = _ConcatEstimators("auto")
    x, y = torch.randn(24, 6), torch.randn(24, 6)
    eager = model(x, y)
    (eager_grad,) = torch.autograd.grad(eager, model.encoder.weight)
    with inductor_vectors():
        compiled = torch.compile(model, fullgraph=True)(x, y)
        (compiled_grad,) = torch.autograd.grad(compiled, model.encoder.weight)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-4, atol=1e-5)


def test_kernel_builds_where_a_compiler_is_present():
    """Where the tools are (CI: a fresh clone, g++ and ninja from the set-up), the kernel builds: the
    fallback must not hide a broken build."""
    import shutil

    from torch.utils import cpp_extension

    if shutil.which(os.environ.get("CXX", "c++")) is None or not cpp_extension.is_ninja_available():
        pytest.skip("no C++ compiler or no ninja here")
    available, why = pairwise_cpp.status()
    assert available, why
