"""GPU benchmark of the pairwise-MLP (concat) critic's reductions: the Triton kernels against eager.

    python benchmarks/pairwise_gpu_benchmark.py [--batch 16384] [--hidden 256] [--dtype bfloat16] [--out DIR]

For each reduction (``rid_fast.kernels.pairwise``: InfoNCE's row cross-entropy, the symmetric
one, DV/NWJ's and SMILE's off-diagonal log-sum-exp, JS's softplus sums), at B = N = ``--batch``,
hidden width ``--hidden``, from a (B, H), c (N, H), w2 (H,), b2 (), it times forward + backward
(gradients of a, c, w2, b2 with an incoming gradient of ones) of:

* ``triton`` — the fused kernels (the B×N scores and the B×N×H hidden layer never held);
* ``eager``  — plain PyTorch as one writes it without them: the scores built a block of
  ``--chunk`` rows at a time (``relu(a_rows[:, None] + c[None]) @ w2 + b2``, each block
  checkpointed so that its (chunk, N, H) hidden layer is not kept for the backward), then the
  reference reduction on the B×N scores (``rid_fast.ops.pairwise_reference``'s formulas).

Timings are medians of ``triton.testing.do_bench``; peak memory is
``torch.cuda.max_memory_allocated`` above the inputs. The target: triton ≥ 20× eager at
B = N = 16384, H = 256, bf16. ``--device cpu`` (with ``TRITON_INTERPRET=1``, tiny ``--batch``) is a
dry run. Writes ``pairwise_gpu_<device>.json`` and prints one JSON line per case.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.testing
from torch.utils.checkpoint import checkpoint

from rid_fast.kernels import pairwise

HERE = Path(__file__).parent
OPS = ["ce_rows", "ce_rows_cols", "lse_negatives", "lse_negatives_clip5", "softplus_negatives"]


def _triton_step(op: str, a, c, w2, b2) -> None:
    ones = torch.ones(a.shape[0], device=a.device)
    if op == "ce_rows":
        loss = pairwise.cross_entropy_rows_forward(a, c, w2, b2)
        pairwise.cross_entropy_rows_backward(ones, a, c, w2, b2, loss)
    elif op == "ce_rows_cols":
        rows, cols = pairwise.cross_entropy_rows_cols_forward(a, c, w2, b2)
        pairwise.cross_entropy_rows_cols_backward(ones, ones, a, c, w2, b2, rows, cols)
    elif op.startswith("lse_negatives"):
        clip = 5.0 if op.endswith("clip5") else None
        lse = pairwise.lse_negatives_forward(a, c, w2, b2, clip=clip)
        pairwise.lse_negatives_backward(ones, a, c, w2, b2, lse, clip=clip)
    else:
        pairwise.softplus_negatives_forward(a, c, w2, b2)
        pairwise.softplus_negatives_backward(ones, a, c, w2, b2)


def _score_rows(a_rows, c, w2, b2):
    return torch.relu(a_rows[:, None, :] + c[None, :, :]) @ w2 + b2


def _eager_scores(a, c, w2, b2, chunk: int) -> torch.Tensor:
    blocks = [
        checkpoint(_score_rows, a[start : start + chunk], c, w2, b2, use_reentrant=False)
        for start in range(0, a.shape[0], chunk)
    ]
    return torch.cat(blocks).float()


def _eager_loss(op: str, scores: torch.Tensor) -> torch.Tensor:
    n_rows = scores.shape[0]
    diagonal = scores[:, :n_rows].diagonal()
    off = torch.zeros_like(scores, dtype=torch.bool)
    off[:, :n_rows].fill_diagonal_(True)
    if op == "ce_rows":
        return (torch.logsumexp(scores, 1) - diagonal).sum()
    if op == "ce_rows_cols":
        return (torch.logsumexp(scores, 1) + torch.logsumexp(scores, 0) - 2 * diagonal).sum()
    if op.startswith("lse_negatives"):
        clipped = scores.clamp(-5.0, 5.0) if op.endswith("clip5") else scores
        return torch.logsumexp(clipped.masked_fill(off, -math.inf), 1).sum()
    return F.softplus(scores.masked_fill(off, -math.inf)).sum()


def _eager_step(op: str, a, c, w2, b2, chunk: int) -> None:
    loss = _eager_loss(op, _eager_scores(a, c, w2, b2, chunk))
    torch.autograd.grad(loss, (a, c, w2, b2))


def _median_ms(step, device: str) -> float:
    if device == "cuda":
        return triton.testing.do_bench(step, warmup=3, rep=30, return_mode="median")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def run_case(op: str, impl: str, batch: int, hidden: int, dtype: torch.dtype, device: str, chunk: int) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    a, c = (torch.randn(batch, hidden, generator=gen, device=device).to(dtype) for _ in range(2))
    w2 = (torch.randn(hidden, generator=gen, device=device) / math.sqrt(hidden)).to(dtype)
    b2 = torch.zeros((), device=device, dtype=dtype)
    if impl == "eager":
        a, c, w2, b2 = (t.requires_grad_(True) for t in (a, c, w2, b2))
        step = lambda: _eager_step(op, a, c, w2, b2, chunk)  # noqa: E731
    else:
        step = lambda: _triton_step(op, a, c, w2, b2)  # noqa: E731
    row = {"op": op, "impl": impl, "B": batch, "H": hidden, "dtype": str(dtype).removeprefix("torch.")}
    try:
        step()  # compilation, autotuning
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            row["peak_gb"] = round((torch.cuda.max_memory_allocated() - base) / 1e9, 3)
        row["ms"] = round(_median_ms(step, device), 3)
    except torch.cuda.OutOfMemoryError:
        row["ms"] = "oom"
    except Exception as error:  # one broken case must not cost the rest of a scarce GPU session
        row["ms"] = "error"
        row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--chunk", type=int, default=128, help="eager: rows per checkpointed block of scores")
    parser.add_argument("--ops", nargs="+", default=OPS, choices=OPS)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to benchmark (--device cpu with TRITON_INTERPRET=1 for a dry run)")
        return 1
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    meta = {"device": device_name, "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d"), "chunk": args.chunk}  # fmt: skip
    rows = []
    for op in args.ops:
        for impl in ("triton", "eager"):
            row = run_case(op, impl, args.batch, args.hidden, getattr(torch, args.dtype), args.device, args.chunk)
            rows.append(row)
            print(json.dumps(row), flush=True)
        triton_ms, eager_ms = rows[-2]["ms"], rows[-1]["ms"]
        if isinstance(triton_ms, float) and isinstance(eager_ms, float):
            rows[-2]["speedup_vs_eager"] = round(eager_ms / triton_ms, 2)
            print(f"{op}: triton {eager_ms / triton_ms:.1f}x eager", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "pairwise_gpu_" + "".join(ch if ch.isalnum() else "_" for ch in device_name).strip("_").lower()
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
