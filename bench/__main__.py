"""``python -m bench [admission|drain|drain-lookups|hostile|census|all]`` (default all): run
the load benchmarks. ``drain`` includes ``drain-lookups``."""

from __future__ import annotations

import argparse
import importlib
import sys

# name: (module, its entry point)
BENCHMARKS = {
    "admission": ("bench.admission", "main"),
    "drain": ("bench.drain", "main"),
    "drain-lookups": ("bench.drain", "main_lookups"),
    "hostile": ("bench.hostile", "main"),
    "census": ("bench.census", "main"),
}
ALL = ("admission", "drain", "hostile", "census")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("which", nargs="?", default="all", choices=[*BENCHMARKS, "all"])
    args = parser.parse_args(argv)
    status = 0
    for name in ALL if args.which == "all" else (args.which,):
        if args.which == "all" and name != ALL[0]:
            print()
        module, entry = BENCHMARKS[name]
        status |= getattr(importlib.import_module(module), entry)() or 0
    return status


if __name__ == "__main__":
    sys.exit(main())
