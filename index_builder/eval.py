"""`python -m index_builder.eval`: the old name of `python -m evaluation`, kept for now."""
from __future__ import annotations

import sys

from evaluation.__main__ import main as evaluate_main

NOTE = "`python -m index_builder.eval` is now `python -m evaluation`; the old name will go in a later release."


def main(argv: list[str] | None = None) -> int:
    """Say where the job moved, then run it with the same arguments."""
    print(NOTE, file=sys.stderr)
    return evaluate_main(argv)


if __name__ == "__main__":
    sys.exit(main())
