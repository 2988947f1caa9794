"""``python -m webhooks check ...`` (offline check) and ``python -m webhooks certs ...``."""

from __future__ import annotations

import os
import sys

from webhooks import certs, check

COMMANDS = {"check": check.main, "certs": certs.main}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print("usage: python -m webhooks {check,certs} ... (--help for each)", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except BrokenPipeError:
        # `check ... | head`: the reader left. Point stdout at devnull so the interpreter's
        # final flush does not fail again (the recipe in Python's signal docs).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
