"""``moelora`` and ``python -m moelora``: the command line, with a clear message when an extra is missing."""

from __future__ import annotations

import sys

from .extras import MissingExtraError


def main(argv: list[str] | None = None) -> int:
    try:
        from .finetune.cli import main as cli_main
    except MissingExtraError as err:
        print(f"moelora: error: {err}", file=sys.stderr)
        return 2
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
