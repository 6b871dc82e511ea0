"""The streaming reductions and their torch.library ops, against direct formulas on the full matrix."""

import math

import pytest
import torch
from estimator_checks import LargestTensor, block_reduction, block_reduction_truth

from rid_fast.ops import library, streaming

TILES = [(16, 32), (32, 16), (7, 5), (1024, 512)]


def _inputs(n_queries, n_keys, dim, dtype=torch.float64, seed=0):
    """q (B, D), k (N, D) in ``dtype`` and σ = 3 (0-dim, the accumulation dtype), all requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(n_queries, dim, generator=gen, dtype=torch.float64) / math.sqrt(dim)).to(dtype)
    k = (torch.randn(n_keys, dim, generator=gen, dtype=torch.float64)).to(dtype)
    scale = torch.tensor(3.0, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return q.requires_grad_(), k.requires_grad_(), scale.requires_grad_()


def _off_diagonal(scores):
    return torch.eye(*scores.shape, dtype=torch.bool)


def direct_cross_entropy_rows(q, k, scale):
    s = scale * (q @ k.T)
    return torch.logsumexp(s, 1) - s.diagonal()


def direct_cross_entropy_rows_cols(q, k, scale):
    s = scale * (q @ k.T)
    return torch.logsumexp(s, 1) - s.diagonal(), torch.logsumexp(s, 0) - s.diagonal()


def direct_lse_negatives(q, k, scale, clip=None):
    s = scale * (q @ k.T)
    if clip is not None:
        s = s.clamp(-clip, clip)
    return torch.logsumexp(s.masked_fill(_off_diagonal(s), -math.inf), 1)


def direct_softplus_negatives(q, k, scale):
    s = scale * (q @ k.T)
    return torch.logaddexp(s, torch.zeros_like(s)).masked_fill(_off_diagonal(s), 0).sum(1)


def direct_cross_entropy_rows_mean(q, k, scale):
    return direct_cross_entropy_rows(q, k, scale).mean()


CASES = [
    ("cross_entropy_rows", lambda *a: library.cross_entropy_rows(*a, "torch"), direct_cross_entropy_rows),
    (
        "cross_entropy_rows_mean_with_grad",
        lambda *a: library.cross_entropy_rows_mean_with_grad(*a)[0],
        direct_cross_entropy_rows_mean,
    ),
    (
        "cross_entropy_rows_cols",
        lambda *a: library.cross_entropy_rows_cols(*a, "torch"),
        direct_cross_entropy_rows_cols,
    ),
    ("lse_negatives", lambda *a: library.lse_negatives(*a, None, "torch"), direct_lse_negatives),
    (
        "lse_negatives_clip",
        lambda *a: library.lse_negatives(*a, 1.5, "torch"),
        lambda *a: direct_lse_negatives(*a, 1.5),
    ),
    ("softplus_negatives", lambda *a: library.softplus_negatives(*a, "torch"), direct_softplus_negatives),
]


def _outputs(result):
    return result if isinstance(result, tuple) else (result,)


@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize("shape", [(2, 2, 3), (37, 37, 17), (37, 56, 5), (130, 149, 64)])
@pytest.mark.parametrize("name,fast,direct", CASES, ids=[c[0] for c in CASES])
def test_op_matches_direct_formula(monkeypatch, tiles, shape, name, fast, direct):
    monkeypatch.setattr(streaming, "DEFAULT_BLOCK", tiles)
    monkeypatch.setattr(streaming, "STRIP_BYTES", tiles[0] * tiles[1] * 8)  # fp64 strips of the tile's size
    n_queries, n_keys, dim = shape
    if name == "cross_entropy_rows_cols":
        n_keys = n_queries
    inputs = _inputs(n_queries, n_keys, dim)
    got, want = _outputs(fast(*inputs)), _outputs(direct(*inputs))
    weights = [torch.randn_like(w) for w in want]
    grads_got = torch.autograd.grad(sum((g * w).sum() for g, w in zip(got, weights)), inputs)
    grads_want = torch.autograd.grad(sum((g * w).sum() for g, w in zip(want, weights)), inputs)
    for a, b in zip(got + grads_got, want + grads_want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name,fast,direct", CASES, ids=[c[0] for c in CASES])
def test_low_precision_inputs_accumulate_in_fp32(small_tiles, dtype, name, fast, direct):
    """Half inputs are upcast per tile: statistics come back in fp32 and equal the fp32 computation
    on the same (rounded) inputs; gradients come back in the input dtype."""
    q, k, scale = _inputs(40, 40, 24, dtype=dtype)
    q32, k32 = (t.detach().float().requires_grad_() for t in (q, k))
    got, want = _outputs(fast(q, k, scale)), _outputs(fast(q32, k32, scale))
    assert all(g.dtype == torch.float32 for g in got)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    weights = [torch.randn_like(w) for w in want]
    grads_got = torch.autograd.grad(sum((g * w).sum() for g, w in zip(got, weights)), (q, k, scale))
    grads_want = torch.autograd.grad(sum((g * w).sum() for g, w in zip(want, weights)), (q32, k32, scale))
    for a, b in zip(grads_got[:2], grads_want[:2]):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b.to(dtype).float(), rtol=0, atol=0)
    torch.testing.assert_close(grads_got[2], grads_want[2], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name,fast,direct", CASES, ids=[c[0] for c in CASES])
def test_opcheck(name, fast, direct):
    """Schema, fake (meta) implementation and autograd registration agree with the real kernels."""
    q, k, scale = _inputs(9, 9, 4, dtype=torch.float32)
    op = {
        "cross_entropy_rows": (torch.ops.rid_fast.cross_entropy_rows.default, (q, k, scale, "torch")),
        "cross_entropy_rows_mean_with_grad": (
            torch.ops.rid_fast.cross_entropy_rows_mean_with_grad.default,
            (q, k, scale),
        ),
        "cross_entropy_rows_cols": (torch.ops.rid_fast.cross_entropy_rows_cols.default, (q, k, scale, "torch")),
        "lse_negatives": (torch.ops.rid_fast.lse_negatives.default, (q, k, scale, None, "torch")),
        "lse_negatives_clip": (torch.ops.rid_fast.lse_negatives.default, (q, k, scale, 1.5, "torch")),
        "softplus_negatives": (torch.ops.rid_fast.softplus_negatives.default, (q, k, scale, "torch")),
    }[name]
    torch.library.opcheck(*op)


@pytest.mark.parametrize("name,fast,direct", CASES, ids=[c[0] for c in CASES])
def test_gradcheck_float64(small_tiles, name, fast, direct):
    inputs = _inputs(19, 19 if name == "cross_entropy_rows_cols" else 35, 3)
    assert torch.autograd.gradcheck(lambda *a: _outputs(fast(*a)), inputs)


@pytest.mark.parametrize("name,fast,direct", CASES, ids=[c[0] for c in CASES])
def test_never_materialises_the_score_matrix(monkeypatch, name, fast, direct):
    monkeypatch.setattr(streaming, "DEFAULT_BLOCK", (64, 64))
    monkeypatch.setattr(streaming, "STRIP_BYTES", 64 * 64 * 4)
    inputs = _inputs(600, 600, 8, dtype=torch.float32)
    with LargestTensor() as mode:
        result = _outputs(fast(*inputs))
        torch.autograd.grad(sum(r.sum() for r in result), inputs)
    # O((B+N)·D + block²): nothing larger than one (600, 8) input or one 64 × 64 tile.
    assert mode.largest <= max(64 * 64, 600 * 8), f"a tensor of {mode.largest} elements was created (B·N = 360000)"


def test_symmetric_ops_on_tiles_with_a_wide_score_range(small_tiles, monkeypatch):
    """Tiles where some rows' scores lie far below the tile's maximum take the per-side path (one
    shifted exponential per rows and columns, not one shared); values and gradients still match."""
    q, k, scale = _inputs(40, 40, 6)
    with torch.no_grad():
        q[::3] *= 400.0  # scores up to ~1e3 in some rows, ~1 in the others: beyond one shared shift
    calls = []
    per_side = streaming._online_lse_update_
    monkeypatch.setattr(streaming, "_online_lse_update_", lambda *a, **kw: calls.append(1) or per_side(*a, **kw))
    got, want = library.cross_entropy_rows_cols(q, k, scale, "torch"), direct_cross_entropy_rows_cols(q, k, scale)
    assert calls, "the per-side path did not run"
    weights = [torch.randn_like(w) for w in want]
    grads_got = torch.autograd.grad(sum((g * w).sum() for g, w in zip(got, weights)), (q, k, scale))
    grads_want = torch.autograd.grad(sum((g * w).sum() for g, w in zip(want, weights)), (q, k, scale))
    for a, b in zip(got + grads_got, want + grads_want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_weighted_keys_ops_name_the_backends_they_lack():
    q, k, scale = _inputs(5, 7, 3, dtype=torch.float32)
    with pytest.raises(ValueError, match="cross_entropy_rows_with_weighted_keys has no 'torch' backend"):
        library.cross_entropy_rows_with_weighted_keys(q, k, scale, "torch")


@pytest.mark.parametrize("tiles", [(16, 32), (7, 5)])
def test_symmetric_ops_read_no_tile_value_off_the_cpu(monkeypatch, tiles):
    """On a GPU, reading a tile's value on the host to pick the shared-exponential path would be a
    host–device sync per tile: off the CPU every tile takes the per-side path, and no tensor value
    is read on the host in the forward or the backward; values and gradients still match."""
    assert streaming._may_share_exponentials(torch.device("cpu"))
    assert not streaming._may_share_exponentials(torch.device("cuda"))
    monkeypatch.setattr(streaming, "DEFAULT_BLOCK", tiles)
    monkeypatch.setattr(streaming, "_may_share_exponentials", lambda device: False)
    q, k, scale = _inputs(37, 37, 17)
    weights = [torch.randn(37, dtype=torch.float64) for _ in range(2)]
    reads = []
    for name in ("__float__", "__int__", "__bool__", "item", "tolist"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _f=original, _n=name: reads.append(_n) or _f(self, *a))
    got = library.cross_entropy_rows_cols(q, k, scale, "torch")
    grads_got = torch.autograd.grad(sum((g * w).sum() for g, w in zip(got, weights)), (q, k, scale))
    monkeypatch.undo()
    assert reads == [], f"tensor values read on the host: {reads}"
    want = direct_cross_entropy_rows_cols(q, k, scale)
    grads_want = torch.autograd.grad(sum((g * w).sum() for g, w in zip(want, weights)), (q, k, scale))
    for a, b in zip(got + grads_got, want + grads_want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


#: (shape, diagonal): a block of one key, the diagonal left out, has no entries (the ring skips it).
KEY_BLOCKS = [
    pytest.param(shape, diagonal, id=f"{'own' if diagonal else 'other'}-block-{'x'.join(map(str, shape))}")
    for shape in [(1, 1, 3), (37, 19, 17), (37, 56, 5)]
    for diagonal in (True, False)
    if shape[1] > 1 or not diagonal
]


@pytest.mark.parametrize("reduction,clip", [("lse", None), ("lse", 1.5), ("softplus", None)])
@pytest.mark.parametrize("shape,diagonal", KEY_BLOCKS)
def test_key_block_with_or_without_positives(small_tiles, shape, reduction, clip, diagonal):
    """The row statistics of one block of keys, as the ring of rid_fast.ops.distributed calls them:
    leaving out the diagonal (the process's own block) or not (another's, which holds no positive);
    values and gradients of row-weighted sums against the direct formula."""
    n_queries, n_keys, dim = shape
    q, k, scale = (t.detach() for t in _inputs(n_queries, n_keys, dim))
    weights = torch.randn(n_queries, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    options = dict(reduction=reduction, clip=clip, diagonal=diagonal)
    value, grads = block_reduction(streaming, q, k, scale, weights, **options)
    truth, truth_grads = block_reduction_truth(q, k, scale, weights, **options)
    for a, b in zip((value, *grads), (truth, *truth_grads)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
