"""``python -m bench [admission|drain|drain-lookups|census|all]`` (default all): run the load
benchmarks."""

from __future__ import annotations

import argparse
import importlib
import sys


def _drain_main():
    """bench.drain's main(), when that benchmark is present."""
    try:
        module = importlib.import_module("bench.drain")
    except ModuleNotFoundError as err:
        if err.name != "bench.drain":
            raise
        return None
    return getattr(module, "main", None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "which",
        nargs="?",
        default="all",
        choices=["admission", "drain", "drain-lookups", "census", "all"],
    )
    args = parser.parse_args(argv)
    status = 0
    if args.which == "drain-lookups":
        from bench import drain as drain_bench

        return drain_bench.main_lookups()
    if args.which in ("admission", "all"):
        from bench import admission

        status |= admission.main() or 0
    if args.which in ("drain", "all"):
        drain = _drain_main()
        if drain is None:
            print("drain benchmark: bench/drain.py has no main(); skipped", file=sys.stderr)
            status |= 1 if args.which == "drain" else 0
        else:
            if args.which == "all":
                print()
            status |= drain() or 0
    if args.which in ("census", "all"):
        from bench import census

        if args.which == "all":
            print()
        status |= census.main() or 0
    return status


if __name__ == "__main__":
    sys.exit(main())
