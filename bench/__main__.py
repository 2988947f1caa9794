"""``python -m bench [admission|drain|hostile|all]`` (default all): run the load benchmarks."""

from __future__ import annotations

import argparse
import importlib
import sys

BENCHMARKS = ("admission", "drain", "hostile")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("which", nargs="?", default="all", choices=[*BENCHMARKS, "all"])
    args = parser.parse_args(argv)
    status = 0
    for name in BENCHMARKS if args.which == "all" else (args.which,):
        if args.which == "all" and name != BENCHMARKS[0]:
            print()
        status |= importlib.import_module(f"bench.{name}").main() or 0
    return status


if __name__ == "__main__":
    sys.exit(main())
