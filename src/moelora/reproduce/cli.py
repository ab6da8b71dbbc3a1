"""The ``reproduce`` command: run (or continue) the grid, then write ``docs/results.md`` and the figures.

Wire it into a parent parser with ``add_parser(subparsers)`` and dispatch with ``run_from_args(args)``.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path

from .runner import DEFAULT_CACHE

logger = logging.getLogger(__name__)

DEFAULT_RESULTS = Path("docs") / "results.md"


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--quick", action="store_true",
                        help="a small grid (synthetic task and a MiniLM comparison), under 15 minutes")
    parser.add_argument("--tasks", nargs="+", metavar="TASK",
                        help="only these tasks (synthetic, rt-minilm, rt-smollm2, siqa-smollm2); default: all")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per reported cell (default 3)")
    parser.add_argument("--cache", default=str(DEFAULT_CACHE), help=f"run cache folder (default {DEFAULT_CACHE})")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel, one process each (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    parser.add_argument("--time-limit", type=float, metavar="MINUTES",
                        help="start no new run after this many minutes (finished runs stay cached)")
    parser.add_argument("--report-only", action="store_true", help="do not run anything; rewrite the results")
    parser.add_argument("--results", default=str(DEFAULT_RESULTS), help=f"results page (default {DEFAULT_RESULTS})")
    parser.set_defaults(reproduce_command=True)
    return parser


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``reproduce`` to the ``moelora`` sub-commands."""
    parser = subparsers.add_parser(
        "reproduce", help="reproduce the paper's comparison (cached, resumable grid) and write docs/results.md",
        description="Run the reproduction grid (methods x optimizers x tasks x seeds, with a learning-rate "
                    "sweep), caching every finished run, then write the results page and figures.",
    )
    return configure(parser)


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this invocation (defaults left out)."""
    parts = ["moelora", "reproduce"]
    if args.quick:
        parts.append("--quick")
    if args.tasks:
        parts += ["--tasks", *args.tasks]
    if args.seeds != 3:
        parts += ["--seeds", str(args.seeds)]
    if args.cache != str(DEFAULT_CACHE):
        parts += ["--cache", args.cache]
    if args.jobs != 1:
        parts += ["--jobs", str(args.jobs)]
    if args.threads != 1:
        parts += ["--threads", str(args.threads)]
    return " ".join(shlex.quote(p) for p in parts)


def _progress_logging() -> None:
    """One line per started / finished run on stderr, whatever the parent command configured."""
    progress = logging.getLogger("moelora.reproduce")
    if not any(getattr(h, "_reproduce_progress", False) for h in progress.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        handler._reproduce_progress = True  # type: ignore[attr-defined]
        progress.addHandler(handler)
    progress.setLevel(logging.INFO)
    progress.propagate = False


def run_from_args(args: argparse.Namespace) -> int:
    """Run (or continue) the grid described by ``args``, then write the results page; returns 0."""
    from .aggregate import collect
    from .grid import build_grid
    from .plots import plot_gate_weights, plot_task
    from .report import write_results
    from .runner import GridRunner, gate_check_seeds, gate_weights_dir, is_done, read_json

    _progress_logging()
    grid = build_grid(quick=args.quick, tasks=args.tasks, seeds=args.seeds)
    cache = Path(args.cache)
    if not args.report_only:
        deadline = None if args.time_limit is None else time.time() + 60 * args.time_limit
        runner = GridRunner(grid, cache, jobs=args.jobs, threads=args.threads, deadline=deadline)
        runner.run()
        logger.info("ran %d runs, %d were already cached", runner.ran, runner.skipped)
    results = collect(grid, cache)
    results_path = Path(args.results)
    docs = results_path.parent
    prefix = "results_quick_" if args.quick else "results_"
    figures = {}
    for key, res in results.items():
        name = f"{prefix}{key}.png"
        if plot_task(res, docs / name):
            figures[key] = name
    gate_check = None
    if "synthetic" in grid.tasks:
        folder = gate_weights_dir(cache, gate_check_seeds(grid.seeds))
        if is_done(folder):
            gate_check = read_json(folder / "summary.json")
            name = f"{prefix}synthetic_gate_weights.png"
            plot_gate_weights(gate_check, docs / name)
            figures["gate_weights"] = name
    write_results(grid, results, results_path, command_line(args), cache, gate_check, figures)
    print(f"wrote {results_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = configure(argparse.ArgumentParser(prog="python -m moelora.reproduce", description=__doc__))
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    return run_from_args(args)
