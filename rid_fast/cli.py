"""The ``rid-fast`` command line.

::

    rid-fast train --config FILE [key=value ...]              one distillation run
    rid-fast train --resume run.out_dir=RUN_DIR               continue it, with RUN_DIR/config.yaml
    rid-fast train --overwrite --config FILE ...              a new run into a folder holding an earlier one
    torchrun --nproc_per_node K -m rid_fast.cli train ...     the same run, data-parallel over K processes
    rid-fast compare --config FILE --seeds K --out DIR        methods × teachers × seeds, paired report
    rid-fast plot RUN_DIR                                     plots of a run or a comparison
    rid-fast pid RUN_DIR                                      PID of the distilled layers: what was transferred
    rid-fast env                                              versions, device, which implementation runs
    rid-fast bench [--estimator infonce ...]                  estimator time and memory, impls side by side
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

import rid_fast
from rid_fast import bench
from rid_fast.ops.dispatch import pairwise_status, resolve_impl, triton_status


def _version(module_name: str) -> str:
    try:
        module = __import__(module_name)
    except ImportError:
        return "not installed"
    return getattr(module, "__version__", "unknown")


def _device_line() -> str:
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name()} ({torch.cuda.device_count()} device(s))"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


#: How ``rid-fast env`` names the pairwise-MLP critic's backends.
_PAIRWISE_PATHS = {"cpp": "C++ kernel", "torch": "blocked PyTorch", "triton": "Triton kernels"}


def _pairwise_line(device: torch.device) -> str:
    """Which path ConcatCritic's estimators take with impl="auto" on ``device``, and why (on the
    CPU this builds the C++ kernel if it is not cached yet)."""
    backend, why = pairwise_status(device)
    return f"{backend} ({_PAIRWISE_PATHS[backend]}): {why}"


def cmd_env(args: argparse.Namespace) -> int:
    """Print what rid_fast runs on."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    runnable, why = triton_status(device)
    rows = [
        ("rid_fast", rid_fast.__version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("triton", _version("triton")),
        ("numpy", _version("numpy")),
        ("device", _device_line()),
        ("triton kernels", ("yes: " if runnable else "no: ") + why),
        (
            'impl="auto"',
            f"{resolve_impl('auto', device, torch.float32)} (for float32/bfloat16/float16 {device.type} tensors)",
        ),
        ("pairwise-MLP critic", _pairwise_line(device)),
        (
            "kernel settings",
            f"RID_FAST_AUTOTUNE={os.environ.get('RID_FAST_AUTOTUNE', '1')} (autotuning on GPUs), "
            f"RID_FAST_FORWARD_KEYS={os.environ.get('RID_FAST_FORWARD_KEYS', '1')} (training's forward "
            "forms dq's weighted keys: 16-bit, D <= 128)",
        ),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


def _format_bytes(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f} MiB"


def _bench_device(name: str) -> str:
    """``--device``: 'cpu', or 'cuda'/'cuda:<index>' of a CUDA device this machine has."""
    kind, sep, index = name.partition(":")
    if kind == "cpu" and not sep:
        return name
    if kind != "cuda" or (sep and not index.isdigit()):
        raise ValueError(f"--device must be 'cpu', 'cuda' or 'cuda:<index>'; got {name!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available here (use --device cpu)")
    if index and int(index) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name


def _check_bench_args(args: argparse.Namespace) -> None:
    """Sizes and counts positive, N ≥ B, a device this machine has; else a ``ValueError`` naming the flag."""
    for flag, value in (("--batch", args.batch), ("--dim", args.dim), ("--repeats", args.repeats)):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1; got {value}")
    if args.keys is not None and args.keys < args.batch:
        raise ValueError(
            f"--keys must be at least --batch (N ≥ B: the keys include the B positives); got {args.keys} < {args.batch}"
        )
    _bench_device(args.device)


def cmd_bench(args: argparse.Namespace) -> int:
    """Time (and optionally measure memory of) one estimator across implementations and critics;
    the timed steps of all of them take turns, so their ratios come from one stretch of time."""
    _check_bench_args(args)
    cases = [
        bench.Case(
            estimator=args.estimator,
            n_queries=args.batch,
            n_keys=args.keys,
            dim=args.dim,
            impl=impl,
            dtype=args.dtype,
            backward=not args.forward_only,
            critic=critic,
            device=args.device,
        )
        for impl in args.impl
        for critic in args.critic
    ]
    timings = bench.time_cases(cases, repeats=args.repeats)
    peaks = [bench.peak_memory_bytes(case) if args.memory else None for case in cases]
    direction = "forward" if args.forward_only else "forward+backward"
    print(
        f"{args.estimator} {direction}: B={args.batch} N={args.keys or args.batch} D={args.dim} "
        f"{args.dtype} on {args.device}"
    )
    print(f"{'impl':<10} {'critic':<7} {'median ms':>10} {'first ms':>10} {'TFLOP/s':>8} {'peak':>10}")
    for case, timing, peak in zip(cases, timings, peaks):
        print(
            f"{case.impl:<10} {case.critic:<7} {timing['median_s'] * 1e3:>10.1f} {timing['first_s'] * 1e3:>10.1f} "
            f"{timing['tflops']:>8.3f} {_format_bytes(peak):>10}"
        )
    return 0


def _overrides(args: argparse.Namespace) -> list[str]:
    """The command line's ``key=value`` overrides, ``--data-dir`` included."""
    overrides = list(args.overrides)
    if args.data_dir is not None:
        overrides.append(f"data.data_dir={args.data_dir}")
    return overrides


def _experiment_config(args: argparse.Namespace):
    """The config file with the command line's overrides."""
    from rid_fast.train.config import load_config

    if args.config is None:
        raise ValueError("the --config FILE argument is required (only train --resume can do without it)")
    return load_config(args.config, _overrides(args))


def _resumed_run(args: argparse.Namespace) -> tuple[Path, list[str]]:
    """The run folder ``train --resume`` names — its ``run.out_dir=`` override, else the config
    file's ``run.out_dir`` — and the other overrides."""
    from rid_fast.train.config import load_config

    overrides = _overrides(args)
    named = [o for o in overrides if o.partition("=")[0].strip() == "run.out_dir"]
    others = [o for o in overrides if o not in named]
    if named:
        return Path(load_config(None, named[-1:]).run.out_dir), others
    if args.config is None:
        raise ValueError("--resume needs the run folder: give run.out_dir=RUN_DIR (or a --config FILE naming it)")
    return Path(load_config(args.config).run.out_dir), others


def cmd_train(args: argparse.Namespace) -> int:
    """Train one student as the config says, or resume a run with its own ``config.yaml`` (the
    overrides given then may not change what was trained); prints the final metrics. Started by
    torchrun, every process runs this, data-parallel; process 0 prints."""
    from rid_fast.train.config import resume_config
    from rid_fast.train.distributed import data_parallel
    from rid_fast.train.loop import Trainer

    try:
        if args.resume:
            run_dir, overrides = _resumed_run(args)
            config = resume_config(run_dir, overrides)
        else:
            config = _experiment_config(args)
            if not args.overwrite:
                _refuse_an_earlier_run(Path(config.run.out_dir))
    except (ValueError, FileNotFoundError) as error:
        raise SameInEveryProcess(str(error)) from None
    with data_parallel(config.run.device) as processes:
        say = print if processes.main else _silent
        if args.resume:
            trainer = Trainer.resume(config)
            done, total = trainer.start_epoch, trainer.total_epochs()
            say(f"resuming {run_dir} with its config.yaml after epoch {done} of {total}" if done < total
                else f"{run_dir} is complete ({total} epochs): nothing left to train")  # fmt: skip
        else:
            trainer = Trainer(config)
        final = trainer.train()
    shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in final.items() if "/" not in k}
    say(f"run folder: {config.run.out_dir}\nfinal: {shown}")
    return 0


class SameInEveryProcess(ValueError):
    """An error that every process of a torchrun launch meets alike (it comes from the command line
    and the files it names, before the processes part): process 0 alone reports it."""


def _refuse_an_earlier_run(run_dir: Path) -> None:
    """A fresh run starts by deleting the checkpoints in its folder: when an earlier run left some
    there, forgetting ``--resume`` would lose that run, so training stops unless ``--overwrite``."""
    from rid_fast.train.loop import CHECKPOINT_NAMES

    found = [name for name in CHECKPOINT_NAMES if (run_dir / "ckpt" / name).exists()]
    if found:
        raise ValueError(
            f"run.out_dir {str(run_dir)!r} holds an earlier run (ckpt/{', ckpt/'.join(found)}): continue it with "
            f"`rid-fast train --resume run.out_dir={run_dir}`, or train a new run there with --overwrite (its "
            "checkpoints are then replaced), or choose another run.out_dir"
        )


def _silent(*args, **kwargs) -> None:
    """``print`` for processes other than process 0 of a torchrun launch."""


def cmd_compare(args: argparse.Namespace) -> int:
    """Every method with every teacher for K seeds; summary.csv, report.md and plots in --out."""
    from rid_fast.train.compare import run_compare
    from rid_fast.train.distributed import launched_by_torchrun

    if launched_by_torchrun():
        raise ValueError(
            "compare trains its runs side by side in worker processes (--workers); start it without torchrun "
            "(torchrun is for one data-parallel train run)"
        )
    config = _experiment_config(args)
    progress = sys.stderr.isatty() if config.run.progress is None else config.run.progress
    run_compare(config, args.out, seeds=args.seeds, progress=progress, workers=args.workers)
    print((Path(args.out) / "report.md").read_text())
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    """Plots of a run folder (metrics.csv) or a comparison folder (summary.csv)."""
    from rid_fast.train.plots import plot_compare, plot_run

    folder = Path(args.run_dir)
    if (folder / "summary.csv").is_file():
        from rid_fast.train.compare import paired_differences, read_summary

        written = plot_compare(folder, paired_differences(read_summary(folder / "summary.csv")))
    else:
        written = plot_run(folder)
    print("\n".join(str(p) for p in written))
    return 0


def cmd_pid(args: argparse.Namespace) -> int:
    """PID of every distilled layer pair of a run (or of every run of a comparison)."""
    from rid_fast.train.measure import format_spread, measure_folder, pid_table

    rows = measure_folder(args.run_dir)
    header = " ".join(f"{name:>15}" for name in ("Red", "Uni_T", "I(Y;S)"))
    print(f"{'method':<14} {'teacher':<10} {'layer':>5} {header}  (bits, seed mean ± sd)")
    for r in pid_table(rows):
        cells = " ".join(f"{format_spread(r[f], r[f + '_sd']):>15}" for f in ("red", "uni_t", "mi_s"))
        print(f"{r['method']:<14} {r['teacher']:<10} {r['layer']:>5} {cells}")
    print(f"wrote {Path(args.run_dir) / 'pid.csv'} and {Path(args.run_dir) / 'pid.png'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rid-fast", description="Fast Redundant Information Distillation.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="one distillation run")
    train.add_argument("--config", help="YAML experiment config (with --resume: read only for run.out_dir)")
    train.add_argument("--data-dir", help="folder holding the dataset files (cifar10: cifar-10-batches-py/)")
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in run.out_dir from its newest intact checkpoint, with the run's own config.yaml",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="train a new run even when run.out_dir holds an earlier run's checkpoints (they are replaced)",
    )
    train.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. optim.lr=0.1 distill.method=vid")
    train.set_defaults(run=cmd_train)

    compare = commands.add_parser("compare", help="methods × teachers × seeds, paired against no-KD")
    compare.add_argument("--config", required=True, help="YAML experiment config (its compare section)")
    compare.add_argument("--seeds", type=int, default=None, help="number of seeds (default: compare.seeds)")
    compare.add_argument("--out", required=True, help="output folder")
    compare.add_argument(
        "--workers", type=int, default=None, help="runs trained side by side (default: CPU cores; 1 on a GPU)"
    )
    compare.add_argument("--data-dir", help="folder holding the dataset files (cifar10: cifar-10-batches-py/)")
    compare.add_argument("overrides", nargs="*", metavar="key=value")
    compare.set_defaults(run=cmd_compare)

    plot = commands.add_parser("plot", help="plots of a run or comparison folder")
    plot.add_argument("run_dir")
    plot.set_defaults(run=cmd_plot)

    pid = commands.add_parser("pid", help="PID (Red, Uni, Syn) of the distilled layers of a run or comparison")
    pid.add_argument("run_dir")
    pid.set_defaults(run=cmd_pid)

    env = commands.add_parser("env", help="versions, device and which implementation runs")
    env.set_defaults(run=cmd_env)

    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    b = commands.add_parser("bench", help="time the estimators, implementations side by side")
    b.add_argument("--estimator", default="infonce", choices=sorted(bench.ESTIMATOR_OPTIONS))
    b.add_argument("--batch", type=int, default=2048, help="B, rows of x")
    b.add_argument("--keys", type=int, default=None, help="N, rows of y (default: B)")
    b.add_argument("--dim", type=int, default=128, help="D, features")
    b.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    b.add_argument("--critic", nargs="+", default=["dot"], choices=["dot", "cosine"])
    b.add_argument("--impl", nargs="+", default=["torch", "reference"], choices=bench.IMPLS)
    b.add_argument("--device", default=default_device)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--forward-only", action="store_true")
    b.add_argument("--memory", action="store_true", help="also measure peak memory (CPU: one subprocess per impl)")
    b.set_defaults(run=cmd_bench)
    return parser


def _torchrun_process() -> tuple[int, int] | None:
    """(RANK, WORLD_SIZE) of a process started by torchrun with several processes, else None."""
    from rid_fast.train.distributed import launched_by_torchrun

    if not launched_by_torchrun():
        return None
    rank, world = os.environ.get("RANK", "0"), os.environ["WORLD_SIZE"]
    return (int(rank) if rank.isdigit() else 0), (int(world) if world.isdigit() else 0)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    launched = _torchrun_process()
    # Under torchrun, process 0 speaks for the run; another process reports only its own errors,
    # naming itself (a device or file only it lacks would otherwise go unexplained).
    speaks = launched is None or launched[0] == 0
    prefix = f"rid-fast {args.command}" + ("" if speaks else f" (process {launched[0]} of {launched[1]})")

    def one_line(message, category, filename, lineno, file=None, line=None):
        if speaks:
            print(f"{prefix}: warning: {message}", file=sys.stderr)

    stopping = []
    if launched is not None:
        # torchrun passes Ctrl-C on to its processes as SIGINT, or stops them with SIGTERM (when one
        # of them fails, and in older versions): either ends as Ctrl-C does, leaving the process group.
        def stop(signum, frame):
            stopping.append(signum)
            raise KeyboardInterrupt

        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, stop)
    with warnings.catch_warnings():  # warnings (a damaged checkpoint skipped, …) as one line each
        warnings.showwarning = one_line
        try:
            return args.run(args)
        except (ValueError, FileNotFoundError) as error:  # bad config or input: a message, not a traceback
            if speaks or not isinstance(error, SameInEveryProcess):
                print(f"{prefix}: error: {error}", file=sys.stderr)
            return 2
        except (KeyboardInterrupt, RuntimeError) as error:  # Ctrl-C: what was checkpointed is kept
            # A process waiting in a collective when the others stop fails there (the peer is gone)
            # before its own signal is handled: that too is the interruption, not an error.
            if isinstance(error, RuntimeError) and not stopping:
                raise
            resume = " (resume it with --resume)" if args.command == "train" else ""
            if speaks:
                print(f"{prefix}: interrupted{resume}", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
