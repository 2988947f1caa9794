"""``python -m webhooks check ...`` (offline check) and ``python -m webhooks certs ...``."""

from __future__ import annotations

import sys

from webhooks import certs, check

COMMANDS = {"check": check.main, "certs": certs.main}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print("usage: python -m webhooks {check,certs} ... (--help for each)", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
