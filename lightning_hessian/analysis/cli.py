"""Command line: ``python -m lightning_hessian {plot,regress,table} RUN_DIR`` (also ``lightning-hessian``).

* ``plot``: a run's curves and density evolution as PNG files (:func:`~lightning_hessian.analysis.plots.plot_run`,
  matplotlib, ``[plot]`` extra); the command selects the non-interactive Agg backend;
* ``regress``: the paper's OLS regressions of per-epoch changes (Table 1 layout);
* ``table``: the per-epoch metrics table (optionally written as CSV).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from lightning_hessian.analysis.events import load_metrics
from lightning_hessian.analysis.plots import PLOT_EXTRA, plot_run
from lightning_hessian.analysis.regressions import curvature_regressions

__all__ = ["build_parser", "main", "plot_run"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_hessian",
        description=(
            "Look at a run logged with lightning_hessian's callbacks (TensorBoard log directory or "
            "CSVLogger metrics.csv): render its curves, fit the paper's curvature regressions, or "
            "print its per-epoch metrics."
        ),
        epilog=(
            "examples:\n"
            "  python -m lightning_hessian plot lightning_logs/version_0 --out plots/\n"
            "  python -m lightning_hessian regress lightning_logs/version_0 --ood-acc ood/acc\n"
            "  python -m lightning_hessian table lightning_logs/version_0 --csv metrics_per_epoch.csv"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{plot,regress,table}")

    def add_source(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--format",
            choices=("auto", "tensorboard", "csv"),
            default="auto",
            help="which logs to read (default: auto, TensorBoard preferred)",
        )

    plot = sub.add_parser(
        "plot",
        help="render curves and the density evolution to PNG files",
        description="Write curves.png, volume.png, accuracy.png, loss.png and density.png (those whose metrics exist).",
    )
    plot.add_argument("run", metavar="RUN_DIR", help="log directory, event file or metrics.csv of one run")
    plot.add_argument("--out", metavar="OUT_DIR", default=None, help="output directory (default: RUN_DIR/plots)")
    plot.add_argument("--dpi", type=int, default=120, help="resolution of the PNG files (default: 120)")
    plot.add_argument("--prefix", default="hessian/", help="HessianMonitor's metric prefix (default: hessian/)")
    plot.add_argument("--volume-prefix", default="volume/", help="LocalVolumeMonitor's prefix (default: volume/)")
    add_source(plot)

    regress = sub.add_parser(
        "regress",
        help="OLS of per-epoch changes of test/OOD accuracy on the top eigenvalue (paper Table 1)",
        description=(
            "Fit Δtest ~ Δλmax, Δtest ~ Δλmax + Δval, Δood ~ Δλmax, Δood ~ Δλmax + Δval "
            "(Alabdulkareem, NeurIPS 2022, §4.2, Table 1). Several runs are pooled (differences within each run)."
        ),
    )
    regress.add_argument("runs", metavar="RUN_DIR", nargs="+", help="one or more runs to pool")
    regress.add_argument(
        "--test-acc", default="test/acc", help="in-distribution test accuracy metric (default: test/acc)"
    )
    regress.add_argument("--ood-acc", default="ood/acc", help="OOD test accuracy metric (default: ood/acc)")
    regress.add_argument(
        "--top-eigenvalue",
        default="hessian/top_eigenvalue",
        help="top eigenvalue metric (default: hessian/top_eigenvalue)",
    )
    regress.add_argument("--val-acc", default="val/acc", help="validation accuracy metric (default: val/acc)")
    regress.add_argument(
        "--accuracy-scale", type=float, default=1.0, help="multiply accuracies, e.g. 100 for percent (default: 1)"
    )
    regress.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    add_source(regress)

    table = sub.add_parser(
        "table",
        help="print the per-epoch metrics table",
        description="Print one row per epoch (last value logged in the epoch).",
    )
    table.add_argument("run", metavar="RUN_DIR", help="log directory, event file or metrics.csv of one run")
    table.add_argument("--csv", metavar="PATH", default=None, help="also write the table to this CSV file")
    table.add_argument("--columns", nargs="+", default=None, metavar="NAME", help="only these metrics")
    add_source(table)
    return parser


def _default_out(run: str) -> Path:
    path = Path(run)
    return (path.parent if path.is_file() else path) / "plots"


def _cmd_plot(args: argparse.Namespace) -> int:
    try:
        import matplotlib
    except ImportError:
        print(f"lightning_hessian plot: error: matplotlib is not installed: {PLOT_EXTRA}", file=sys.stderr)
        return 1
    matplotlib.use("Agg")  # the command line process only: no display needed
    out = Path(args.out) if args.out is not None else _default_out(args.run)
    written = plot_run(
        args.run, out, hessian_prefix=args.prefix, volume_prefix=args.volume_prefix, dpi=args.dpi, format=args.format
    )
    any_written = False
    for name, result in written.items():
        if isinstance(result, Path):
            any_written = True
            print(f"wrote {result}")
        else:
            print(f"skipped {name}: {result}")
    return 0 if any_written else 1


def _cmd_regress(args: argparse.Namespace) -> int:
    tables = [load_metrics(run, format=args.format) for run in args.runs]
    results = curvature_regressions(
        tables,
        test_acc=args.test_acc,
        ood_acc=args.ood_acc,
        top_eigenvalue=args.top_eigenvalue,
        val_acc=args.val_acc,
        accuracy_scale=args.accuracy_scale,
        warn=False,
    )
    if args.json:
        payload = {"results": {k: v.as_dict() for k, v in results.items()}, "skipped": results.skipped}
        print(json.dumps(payload, indent=2, default=float))
    else:
        print(results.summary())
    return 0 if results else 1


def _cmd_table(args: argparse.Namespace) -> int:
    table = load_metrics(args.run, format=args.format)
    print(table.to_string(columns=args.columns))
    if args.csv is not None:
        path = table.to_csv(args.csv, columns=args.columns)
        print(f"wrote {path}", file=sys.stderr)
    return 0


def _ensure_printable() -> None:
    """Never crash on 'Δ' or '²' with a non-UTF-8 stdout."""
    for stream in (sys.stdout, sys.stderr):
        encoding = getattr(stream, "encoding", None) or "ascii"
        try:
            "Δ²".encode(encoding)
        except (UnicodeEncodeError, LookupError):
            reconfigure = getattr(stream, "reconfigure", None)
            if reconfigure is not None:
                reconfigure(errors="replace")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    _ensure_printable()
    args = build_parser().parse_args(argv)
    commands = {"plot": _cmd_plot, "regress": _cmd_regress, "table": _cmd_table}
    try:
        return commands[args.command](args)
    except (FileNotFoundError, ValueError, KeyError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"lightning_hessian {args.command}: error: {message}", file=sys.stderr)
        return 1
