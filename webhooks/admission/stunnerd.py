"""What a stunnerd container looks like, and its ``--udp-thread-num`` flag in every spelling.

stunnerd parses flags with spf13/pflag: ``--udp-thread-num=N``, ``--udp-thread-num N``,
``-u N``, ``-u=N`` and ``-uN`` all set it, the last occurrence wins, and ``--`` ends the
flags. The flag sets the number of SO_REUSEPORT UDP sockets and read loops per UDP
listener (l7mp/stunner cmd/stunnerd/main.go).
"""

from __future__ import annotations

from typing import Any

CONTAINER_NAMES = frozenset({"stunner-daemon", "stunnerd"})  # operator / static manifests
THREAD_FLAG = "--udp-thread-num"
THREAD_SHORT = "-u"
# What the operator renders when Dataplane.spec.command/args are unset.
OPERATOR_DEFAULT_COMMAND = ["stunnerd"]
OPERATOR_DEFAULT_ARGS = ["-w", "--udp-thread-num=16"]


def image_repository(image: Any) -> str:
    """``docker.io/l7mp/stunnerd:1.2.0@sha256:...`` -> ``docker.io/l7mp/stunnerd``."""
    if not isinstance(image, str):
        return ""
    image = image.split("@", 1)[0]
    slash = image.rfind("/")
    colon = image.rfind(":")
    return image[:colon] if colon > slash else image


def is_stunnerd(container: Any) -> bool:
    """Named like the operator's or the static manifests' container, or running the
    stunnerd image or binary."""
    if not isinstance(container, dict):
        return False
    name = container.get("name")
    if isinstance(name, str) and name in CONTAINER_NAMES:
        return True
    if image_repository(container.get("image")).endswith("stunnerd"):
        return True
    command = container.get("command")
    return (
        isinstance(command, list)
        and bool(command)
        and isinstance(command[0], str)
        and command[0].rsplit("/", 1)[-1] == "stunnerd"
    )


def stunnerd_containers(pod_spec: Any) -> list[tuple[int, dict]]:
    """(index, container) of every stunnerd container in a pod spec."""
    if not isinstance(pod_spec, dict) or not isinstance(pod_spec.get("containers"), list):
        return []
    return [(i, c) for i, c in enumerate(pod_spec["containers"]) if is_stunnerd(c)]


def _flag_positions(argv: list) -> list[tuple[int, str]]:
    """(index, spelling) of each thread flag; spelling says where its value sits."""
    found = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not isinstance(arg, str):
            i += 1
            continue
        if arg == "--":
            break
        if arg in (THREAD_FLAG, THREAD_SHORT):
            found.append((i, "next"))
            i += 2
            continue
        if arg.startswith(THREAD_FLAG + "=") or arg.startswith(THREAD_SHORT + "="):
            found.append((i, "equals"))
        elif arg.startswith(THREAD_SHORT) and not arg.startswith("--") and len(arg) > 2:
            found.append((i, "attached"))
        i += 1
    return found


def _value(argv: list, index: int, spelling: str) -> str | None:
    arg = argv[index]
    if spelling == "next":
        nxt = argv[index + 1] if index + 1 < len(argv) else None
        return nxt if isinstance(nxt, str) else None
    if spelling == "equals":
        return arg.split("=", 1)[1]
    return arg[len(THREAD_SHORT) :]


def thread_values(argv: list) -> list[str | None]:
    """The raw value of every thread flag occurrence (None where the value is missing)."""
    return [_value(argv, i, s) for i, s in _flag_positions(argv)]


def effective_threads(argv: list) -> int | None:
    """The thread count stunnerd will use (last occurrence wins); None if unset/invalid."""
    values = thread_values(argv)
    if not values or values[-1] is None:
        return None
    try:
        return int(values[-1])
    except ValueError:
        return None


def with_threads(argv: list, threads: int) -> list:
    """``argv`` with every thread flag set to ``threads``, each in its own spelling; the
    flag is appended when absent. Nothing else in argv changes."""
    out = list(argv)
    positions = _flag_positions(out)
    if not positions:
        # Flags after "--" would be positional arguments: insert before it.
        at = out.index("--") if "--" in out else len(out)
        return out[:at] + [f"{THREAD_FLAG}={threads}"] + out[at:]
    # Walk backwards so insertions don't shift the positions still to do.
    for index, spelling in reversed(positions):
        arg = out[index]
        if spelling == "next":
            if index + 1 < len(out):
                out[index + 1] = str(threads)
            else:
                out.append(str(threads))
        elif spelling == "equals":
            out[index] = f"{arg.split('=', 1)[0]}={threads}"
        else:
            out[index] = f"{THREAD_SHORT}{threads}"
    return out
