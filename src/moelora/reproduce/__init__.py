"""Reproduce the paper's comparison: a cached, resumable grid of methods x optimizers x tasks x seeds.

Modules (one concept each):

- ``grid``: the methods (rows), optimizers, tasks with their budgets and learning-rate candidates, cells;
- ``synthetic``: the teacher-student regression (a known mixture of low-rank maps);
- ``gate_weights``: whether the section 5 gate weights show up as per-expert learning speed;
- ``runner``: runs cells into the cache (skipping finished ones), the sweep's learning-rate choice;
- ``aggregate``: mean ± std over seeds, curves, paired comparisons;
- ``plots``: convergence figures; ``report``: ``docs/results.md``;
- ``cli``: ``add_parser(subparsers)`` and ``run_from_args(args)`` for ``moelora reproduce``.

Needs the ``train`` extra (``pip install 'moelora[train]'``).
"""

from ..extras import require_extra

require_extra("train", "moelora.reproduce (moelora reproduce)")

from .cli import add_parser, run_from_args  # noqa: E402  (after the check, which names the extra)
from .grid import METHODS, Cell, Grid, build_grid  # noqa: E402

__all__ = ["METHODS", "Cell", "Grid", "add_parser", "build_grid", "run_from_args"]
