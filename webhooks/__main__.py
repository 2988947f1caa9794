"""``python -m webhooks check ...`` (offline check) and ``python -m webhooks certs ...``.

Exit status 2 is a usage error or input that cannot be read, 3 a failure of the command
itself (a bug: the traceback is printed), 141 a reader of stdout that went away (as a
shell reports a SIGPIPE); never 1, which ``check`` keeps for "denied".
"""

from __future__ import annotations

import os
import signal
import sys
import traceback

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
        sys.exit(128 + signal.SIGPIPE)
    except Exception:
        # An uncaught exception would exit 1, which a pipeline reads as "denied".
        traceback.print_exc()
        sys.exit(3)
