"""How close the BROJA solver's certificate comes to ``tol``, per family of random distributions.

    python benchmarks/pid_accuracy.py [--n 128] [--tol 1e-8] [--device cpu] [--out DIR]

For each family (Dirichlet(1) with every entry, Dirichlet(1) with 85 % of the entries zeroed, and
Dirichlet(0.02) with 30 % zeroed, whose entries span hundreds of decades) and shape (|Y|, |T|, |S|),
n seeded distributions are solved in one :func:`rid_fast.pid.broja_batch` call. Writes
``pid_accuracy.json`` and ``.md`` (under ``benchmarks/results/`` unless ``--out``): per row, the
Newton steps (the call's, and the mean per distribution), how many distributions stopped above
``tol`` and their largest certified gap. No
timings: every number is a property of the inputs and the solver (summation order aside).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import warnings
from pathlib import Path

import torch

from rid_fast import pid

__all__ = ["random_distributions"]

FAMILIES = {  # name: (Dirichlet concentration, probability that an entry is zeroed)
    "Dirichlet(1)": (1.0, 0.0),
    "Dirichlet(1), 85 % zeros": (1.0, 0.85),
    "Dirichlet(0.02), 30 % zeros": (0.02, 0.3),
}
# (4, 1, 6): a source with a single value; (10, 10, 10): the RID protocol's own shape.
SHAPES = [(3, 3, 3), (4, 1, 6), (3, 5, 4), (6, 12, 9), (10, 10, 10)]
RESULTS = Path(__file__).parent / "results"


def random_distributions(n: int, shape, *, concentration: float = 1.0, zeros: float = 0.0, seed: int = 0):
    """n Dirichlet(``concentration``) distributions of ``shape`` (float64), each entry then zeroed
    with probability ``zeros`` (a distribution left all zero gets its first entry); drawn from
    their own generator, so they do not depend on the global random state."""
    gen = torch.Generator().manual_seed(seed)
    size = math.prod(shape)
    # torch.distributions.Gamma takes no generator; the op it samples with does.
    p = torch._standard_gamma(torch.full((n, size), concentration, dtype=torch.float64), generator=gen)
    p = p * (torch.rand(n, size, generator=gen, dtype=torch.float64) >= zeros)
    p[:, 0] += (p.sum(1) == 0).double()  # never all zero
    return (p / p.sum(1, keepdim=True)).reshape(n, *shape)


def run_row(family: str, shape: tuple[int, int, int], n: int, tol: float, device: str, seed: int) -> dict:
    concentration, zeros = FAMILIES[family]
    p = random_distributions(n, shape, concentration=concentration, zeros=zeros, seed=seed).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # counted below instead
        result = pid.broja_batch(p, tol=tol)
    gap = result.gap.cpu()
    return {
        "family": family,
        "shape": list(shape),
        "n": n,
        "seed": seed,
        "newton_steps": result.iterations,
        "mean_steps_per_distribution": float(result.steps.double().mean()),
        "above_tol": int((gap > tol / pid.LN2).sum()),
        "max_gap_bits": float(gap.max()),
    }


def _table(rows: list[dict], conditions: dict, tol: float) -> str:
    described = ", ".join(f"{k} {v}" for k, v in conditions.items())
    lines = [
        "# BROJA PID: certified accuracy",
        "",
        f"Conditions: {described}. tol = {tol:g} nats = {tol / pid.LN2:.3g} bits.",
        "Each row is one `broja_batch` call on n seeded distributions (`python benchmarks/pid_accuracy.py`).",
        "",
        "| family | shape (Y, T, S) | n | Newton steps | mean steps per distribution | stopped above tol "
        "| largest gap (bits) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['family']} | {tuple(r['shape'])} | {r['n']} | {r['newton_steps']} | "
        f"{r['mean_steps_per_distribution']:.1f} | {r['above_tol']} | {r['max_gap_bits']:.2e} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--tol", type=float, default=1e-8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    conditions = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.machine(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    for i, family in enumerate(FAMILIES):
        for shape in SHAPES:
            seed = 1000 * i + sum(shape)
            rows.append(run_row(family, shape, args.n, args.tol, args.device, seed))
            r = rows[-1]
            print(
                f"{family:>28} {str(tuple(shape)):>13} {r['newton_steps']:3d} steps "
                f"(mean {r['mean_steps_per_distribution']:4.1f})  "
                f"{r['above_tol']:3d}/{r['n']} above tol  largest gap {r['max_gap_bits']:.2e} bits",
                flush=True,
            )
            stem = args.out / "pid_accuracy"
            stem.with_suffix(".json").write_text(
                json.dumps({"conditions": conditions, "tol": args.tol, "rows": rows}, indent=2)
            )
            stem.with_suffix(".md").write_text(_table(rows, conditions, args.tol))


if __name__ == "__main__":
    main()
