"""The fused Triton kernels under the Triton interpreter (CPU), against the reference.

Run as its own pytest invocation with TRITON_INTERPRET=1 in the environment before Python starts
(``make test-interpret``): the variable is read when the kernels are decorated. The interpreter
runs fp32 and fp16 (its bf16 dot is wrong), on small odd shapes; tiles are 16 × 16, so every
shape below spans several tiles with ragged edges.
"""

import math
import os

import pytest
import torch
from distributed_worker import kernels_job, run_world
from estimator_checks import (
    DEFAULT_TOLERANCES,
    FP32_UNIT_ROUNDOFF,
    KERNEL_ESTIMATORS,
    Result,
    assert_compiles_like_eager,
    assert_every_candidate_config_matches,
    assert_far_below_zero_matches,
    assert_matches_reference,
    block_reduction,
    block_reduction_truth,
    correlated_pair,
    direct_row_reduction,
    evaluate,
)

from rid_fast import kernels
from rid_fast.kernels import launch
from rid_fast.mi import functional
from rid_fast.ops import library

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 before Python starts"
    ),
]


SHAPES = [
    (n_queries, n_keys, dim)
    for n_queries in (1, 37, 130)
    for n_keys in (n_queries, n_queries + 19)
    for dim in (3, 17, 64)
] + [(37, 37, 130)]  # D > 128: chunked feature loop and a backward grid split along D


def _cases():
    for label, (name, temperature, options) in KERNEL_ESTIMATORS.items():
        for n_queries, n_keys, dim in SHAPES:
            if options.get("symmetric") and n_keys != n_queries:
                continue
            if name != "infonce" and n_keys < 2:
                continue
            # Both critics across the shapes, except SMILE: its clip makes the gradient jump, and the
            # cosine critic's fp16 normalisation (outside the kernels, the same in both fp16 paths)
            # moves scores across the clip relative to the float64 truth.
            critic = "cosine" if (n_queries + dim) % 2 and name != "smile" else "dot"
            yield pytest.param(
                name,
                temperature,
                options,
                n_queries,
                n_keys,
                dim,
                critic,
                id=f"{label}-{n_queries}-{n_keys}-{dim}-{critic}",
            )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name,temperature,options,n_queries,n_keys,dim,critic", list(_cases()))
def test_matches_reference(name, temperature, options, n_queries, n_keys, dim, critic, dtype):
    x, y = correlated_pair(n_queries, n_keys, dim)
    assert_matches_reference(name, x, y, temperature=temperature, critic=critic, impl="triton", dtype=dtype, **options)


@pytest.mark.parametrize(
    "dtype,weighted_keys",
    [(torch.float16, True), (torch.float16, False), (torch.float32, False)],
    ids=["16bit-keys_fwd", "16bit-grad_q", "fp32"],
)
@pytest.mark.parametrize("label", ["infonce_symmetric", "smile_clipped_dv", "js"])
def test_every_gpu_candidate_config(monkeypatch, label, dtype, weighted_keys):
    """The GPU's tiles (64–128 rows and columns), which the 16 × 16 interpreter default never runs:
    a shape with two ragged row tiles of the largest and a feature dimension split in chunks (fp32).
    16-bit training runs the forward with the weighted keys at this D; the dq kernel, which it
    spares, runs at D > 128 — forced here at the same shape."""
    if not weighted_keys:
        monkeypatch.setenv("RID_FAST_FORWARD_KEYS", "0")
    assert_every_candidate_config_matches(monkeypatch, label, (150, 170, 40), dtype=dtype, device="cpu")


@pytest.mark.parametrize(
    "dtype,dim,grad,forward_keys,expected",
    [
        (torch.float16, 17, True, "1", ["row_stats_keys_fwd", "grad_k"]),
        (torch.float16, 128, True, "1", ["row_stats_keys_fwd", "grad_k"]),
        (torch.float16, 130, True, "1", ["row_stats_fwd", "grad_q", "grad_k"]),  # u would not fit the registers
        (torch.float32, 17, True, "1", ["row_stats_fwd", "grad_q", "grad_k"]),
        (torch.float16, 17, False, "1", ["row_stats_fwd"]),  # inference: no weighted keys to pay for
        (torch.float16, 17, True, "0", ["row_stats_fwd", "grad_q", "grad_k"]),  # RID_FAST_FORWARD_KEYS=0
    ],
    ids=["fp16-D17", "fp16-D128", "fp16-D130", "fp32", "no-grad", "turned-off"],
)
@pytest.mark.parametrize("label", ["infonce", "nwj", "smile", "smile_clipped_dv", "js"])
def test_training_sweeps_once_in_the_backward(monkeypatch, label, dtype, dim, grad, forward_keys, expected):
    """Where the forward forms dq's weighted keys, the backward runs only the dk kernel. SMILE's
    default gradient is JS's: in training its value takes one more forward, the clipped
    log-sum-exps without autograd (so without weighted keys), before JS's sweeps."""
    if label == "smile" and grad:
        expected = ["row_stats_fwd", *expected]
    monkeypatch.setenv("RID_FAST_FORWARD_KEYS", forward_keys)
    launched = []
    run = launch.run

    def recording_run(name, *args, **kwargs):
        launched.append(name)
        run(name, *args, **kwargs)

    monkeypatch.setattr(launch, "run", recording_run)
    name, temperature, options = KERNEL_ESTIMATORS[label]
    x, y = (t.to(dtype).requires_grad_(grad) for t in correlated_pair(21, 30, dim))
    value = functional.mi_bound(x, y, name, temperature=temperature, impl="triton", **options)
    if grad:
        torch.autograd.grad(value, (x, y))
    assert launched == expected


def test_confident_positives_keep_their_precision():
    """InfoNCE whose positives hold all but 0.1–0.5 % of each row's softmax, fp16 inputs (the
    forward forms the weighted keys): dq ≈ σ a_i ((p_ii − 1) k_i + Σ_j≠i p_ij k_j), two small terms
    that cancel in part. p_ii − 1 comes from expm1 in fp32; rounded to fp16 (a weight of the MMA)
    it would be off by up to half an ulp of 1 — measured: 2.8 % of the gradient's scale, against
    0.24 % here. (The eager reference in fp16 is off by 30 %: its scores are fp16.)"""
    x, y = correlated_pair(37, 56, 64, rho=0.995)  # cosine critic: every positive scores ≈ 0.995 / τ
    options = dict(temperature=0.09, critic="cosine")
    truth = evaluate("infonce", x.half().double(), y.half().double(), dtype=torch.float64, impl="reference",
                     **{**options, "temperature": float(torch.tensor(0.09, dtype=torch.float32))})  # fmt: skip
    fast = evaluate("infonce", x, y, dtype=torch.float16, impl="triton", **options)
    for got, want in zip(fast.grads[:2], truth.grads[:2]):
        assert (got - want).abs().max() <= 0.01 * want.abs().max()


def test_training_compiles_with_fullgraph():
    """A model whose loss trains through the weighted-keys ops compiles whole (the ops are opaque
    to the compiler) and matches eager, values and gradients."""
    torch.manual_seed(0)
    encoder = torch.nn.Linear(8, 8).half()

    def loss(x, y):
        q = encoder(x)
        return functional.infonce(q, y, impl="triton") + functional.js(q, y, temperature=1.0, impl="triton")

    x, y = (t.half() for t in correlated_pair(20, 20, 8))
    assert_compiles_like_eager(loss, encoder.weight, x, y)


@pytest.mark.parametrize("op,options", [
    ("cross_entropy_rows_with_weighted_keys", ()),
    ("lse_negatives_with_weighted_keys", (None,)),
    ("lse_negatives_with_weighted_keys", (0.8,)),
    ("softplus_negatives_with_weighted_keys", ()),
])  # fmt: skip
def test_weighted_keys_ops_pass_opcheck(op, options):
    x, y = correlated_pair(13, 20, 8)
    q, k = x.half().requires_grad_(), y.half().requires_grad_()
    scale = torch.tensor(2.0, requires_grad=True)
    torch.library.opcheck(getattr(torch.ops.rid_fast, op).default, (q, k, scale, *options, "triton"))


def test_auto_stays_on_streaming_for_cpu_tensors(monkeypatch):
    """Under the interpreter Triton can run on CPU tensors, but ``impl="auto"`` keeps them on the
    streaming path. Both give the same values, so the test records which backend the ops called."""
    called = []
    backend = library._backend
    monkeypatch.setattr(library, "_backend", lambda name: called.append(name) or backend(name))
    x, y = (t.float() for t in correlated_pair(8, 8, 4))
    functional.infonce(x, y)
    assert called == ["torch"]
    called.clear()
    functional.infonce(x, y, impl="triton")
    assert called == ["triton"]  # the record tells the backends apart


# The interpreter evaluates the exponentials of entries that a select then drops with numpy, which
# warns when they overflow; on a GPU they are discarded silently.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("label", ["infonce", "infonce_symmetric", "dv", "smile_clipped_dv"])
def test_scores_far_below_zero_on_ragged_tiles(label, dtype):
    """Every score ≈ −120 on ragged 16 × 16 tiles: the gradients stay finite and match (fp16:
    through the forward that forms the weighted keys)."""
    assert_far_below_zero_matches(label, (37, 56, 17), dtype=dtype, device="cpu")


#: (shape, diagonal): a block of one key, the diagonal left out, has no entries (the ring skips it).
KEY_BLOCKS = [
    pytest.param(shape, diagonal, id=f"{'own' if diagonal else 'other'}-block-{'x'.join(map(str, shape))}")
    for shape in [(1, 1, 3), (37, 19, 17), (9, 20, 130)]
    for diagonal in (True, False)
    if shape[1] > 1 or not diagonal
]


# A block of one key without positives: the masked kernel's row has no entries (log 0 = −inf, which
# the interpreter's numpy warns about) before the diagonal's term is added back.
@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
@pytest.mark.parametrize("reduction,clip", [("lse", None), ("lse", 1.5), ("softplus", None)])
@pytest.mark.parametrize("shape,diagonal", KEY_BLOCKS)
def test_key_block_with_or_without_positives(shape, reduction, clip, diagonal):
    """One block of keys as the ring of rid_fast.ops.distributed calls the kernels: the diagonal
    left out (the process's own block) or every key counted (another process's block, no
    positives: the diagonal's terms added back to the masked kernels'). fp32 values and gradients of a
    row-weighted sum against the float64 truth, within twice the error of the direct formula in
    fp32 or the default fp32 tolerance; dσ, a sum over all B·N weights, also within the first-order
    bound of such a sum in any order, u·(⌈log₂ BN⌉ + ⌈N/16⌉ + κ)·Σ|W_ij S_ij|/σ with κ bounding
    the relative error of one weight (|S| + |ℓ| + σ‖q_i‖‖k_j‖ + 1, see ``reduction_error_bound``)."""
    n_queries, n_keys, dim = shape
    x, y = correlated_pair(max(n_queries, n_keys), max(n_queries, n_keys), dim)
    q, k = x[:n_queries].float(), y[:n_keys].float()  # a block may hold fewer keys than rows
    scale = torch.tensor(2.0)
    weights = torch.randn(n_queries, generator=torch.Generator().manual_seed(1))
    options = dict(reduction=reduction, clip=clip, diagonal=diagonal)
    value, grads = block_reduction(kernels, q, k, scale, weights, **options)
    truth, truth_grads = block_reduction_truth(q, k, scale, weights, **options)
    ref_q, ref_k, ref_scale = (t.clone().requires_grad_() for t in (q, k, scale))
    ref_value = direct_row_reduction(ref_q, ref_k, ref_scale, **options)
    ref_grads = torch.autograd.grad((ref_value * weights).sum(), (ref_q, ref_k, ref_scale))
    rtol, atol = DEFAULT_TOLERANCES[torch.float32]
    # dσ's order-free bound, from the weights W_ij = ∂(Σ_i w_i r_i)/∂S_ij in float64.
    s = scale.double() * (q.double() @ k.double().T)
    s_in = s.detach().clone().requires_grad_()
    (w_s,) = torch.autograd.grad((direct_row_reduction_from_scores(s_in, **options) * weights.double()).sum(), s_in)
    norms = q.double().norm(dim=1)[:, None] * k.double().norm(dim=1)[None, :] * 2.0
    kappa = s.abs() + truth.abs().max() + norms + 1
    terms = math.ceil(math.log2(n_queries * n_keys + 1)) + math.ceil(n_keys / 16)
    d_scale_bound = FP32_UNIT_ROUNDOFF * float(((kappa + terms) * (w_s * s).abs()).sum()) / 2.0
    names = ("value", "dq", "dk", "dσ")
    for what, got, want, ref in zip(names, (value, *grads), (truth, *truth_grads), (ref_value, *ref_grads)):
        error = float((got.double() - want).abs().max())
        bound = max(2 * float((ref.detach().double() - want).abs().max()), atol + rtol * float(want.abs().max()))
        if what == "dσ":
            bound = max(bound, d_scale_bound)
        assert error <= bound, f"{what}: error {error:.3g} > bound {bound:.3g}"


def direct_row_reduction_from_scores(s, *, reduction, clip, diagonal):
    """:func:`estimator_checks.direct_row_reduction` on given scores S (σ = 1, q = S, k = I)."""
    return direct_row_reduction(s, torch.eye(s.shape[1], dtype=s.dtype), 1.0, reduction=reduction, clip=clip,
                                diagonal=diagonal)  # fmt: skip


RING_SIZES = (5, 4)


@pytest.fixture(scope="module")
def ring_results():
    """Every kernel-tier estimator over the ring of two gloo processes (5 and 4 rows) on the Triton
    backend (one spawn for all)."""
    return run_world(len(RING_SIZES), kernels_job(RING_SIZES))


@pytest.mark.parametrize("label", list(KERNEL_ESTIMATORS))
def test_ring_across_processes_runs_the_kernels(ring_results, label):
    """The ring on the kernels (the other process's block: every key counted): the value, the
    same on both processes, and the gradients — local rows' concatenated and the temperature's
    averaged, each divided by the W of DDP's convention — meet the accuracy contract against the
    single-process float64 truth on the whole batch."""
    name, temperature, options = KERNEL_ESTIMATORS[label]
    world = len(RING_SIZES)
    per_process = [results[label] for results in ring_results]
    assert float(per_process[0][0]) == float(per_process[1][0])
    grads = [[grads[i] for _, grads in per_process] for i in range(3)]
    fast = Result(
        per_process[0][0].double(),
        (torch.cat(grads[0]).double() / world, torch.cat(grads[1]).double() / world, sum(grads[2]).double() / world),
    )
    x, y = correlated_pair(sum(RING_SIZES), sum(RING_SIZES), 5)
    assert_matches_reference(
        name, x, y, temperature=temperature, impl="triton", dtype=torch.float32, fast=fast, **options
    )
