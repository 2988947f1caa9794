"""What a stunnerd container looks like, and how stunnerd reads its ``--udp-thread-num``.

stunnerd parses its flags with spf13/pflag (l7mp/stunner cmd/stunnerd/main.go; pflag
flag.go ``parseArgs``, ``parseLongArg``, ``parseShortArg``, ``parseSingleShortArg``):

- the flags are the program's argv after its name; in Kubernetes that is ``command[1:]``
  followed by ``args`` (``command`` replaces the image ENTRYPOINT, ``args`` its CMD; the
  stock image has no ENTRYPOINT and CMD ``stunnerd -c /stunnerd.conf``, and the
  operator always renders ``command: [stunnerd]``);
- positional arguments do not end the flags (interspersed); ``--`` does;
- ``--name=v``; ``--name v`` when the flag takes a value (the next argument, whatever it
  looks like, even ``--``); a bool flag takes no next argument;
- ``-x`` starts a cluster of shorthands: a bool one (``-w``) lets the cluster go on, one
  that takes a value ends it: ``-wu4`` is ``-w -u 4``, ``-wu 4`` too, ``-uw`` is u="w",
  ``-u=4`` is u="4";
- the last occurrence wins; an int is read by Go's ``strconv.ParseInt(s, 0, 64)`` (``0x10``
  is 16, ``010`` is 8).

An unknown flag makes stunnerd exit at startup; it is read here as one that takes no value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

CONTAINER_NAMES = frozenset({"stunner-daemon", "stunnerd"})  # operator / static manifests
THREAD_FLAG = "--udp-thread-num"
THREAD_NAME, THREAD_LETTER = "udp-thread-num", "u"
# Flags stunnerd registers that take a value: its own, k8s.io/cli-runtime's ConfigFlags
# (NewConfigFlags(true).AddFlags) and the CDS discovery flags (pkg/config/client).
LONG_WITH_VALUE = frozenset(
    {
        "config", "log", "log-format", "id", THREAD_NAME,
        "kubeconfig", "cache-dir", "client-certificate", "client-key", "token", "as",
        "as-uid", "as-group", "as-user-extra", "cluster", "user", "namespace", "context",
        "server", "tls-server-name", "certificate-authority", "request-timeout",
        "cds-server-address", "cds-server-namespace", "cds-server-port",
    }
)  # fmt: skip
# -c config, -l log, -i id, -u udp-thread-num; -n namespace, -s server (cli-runtime).
# The bool ones (-w watch, -d dry-run, -v verbose) let a cluster go on.
SHORT_WITH_VALUE = frozenset("cliusn")
# A shell between Kubernetes and stunnerd hides the flags in a script.
SHELLS = frozenset({"sh", "bash", "ash", "dash", "zsh", "ksh", "mksh", "busybox"})
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


def _basename(arg: str) -> str:
    return arg.rsplit("/", 1)[-1]


# Go's integer literal syntax as strconv.ParseInt(s, 0, 64) reads it.
_GO_INT = re.compile(
    r"[+-]?(?:0[xX](?:_?[0-9a-fA-F])+|0[bB](?:_?[01])+|0[oO](?:_?[0-7])+|0(?:_?[0-7])*"
    r"|[1-9](?:_?[0-9])*)"
)
_INT64 = 1 << 63


def go_int(text: str | None) -> int | None:
    """The int pflag reads from ``text`` (``strconv.ParseInt(s, 0, 64)``), None if stunnerd
    would refuse it."""
    if text is None or not _GO_INT.fullmatch(text):
        return None
    sign = -1 if text[0] == "-" else 1
    digits = text.lstrip("+-").replace("_", "").lower()
    if digits[:2] in ("0x", "0b", "0o"):
        value = int(digits[2:], {"x": 16, "b": 2, "o": 8}[digits[1]])
    elif digits[0] == "0":
        value = int(digits, 8)  # a leading 0 means octal
    else:
        value = int(digits)
    value *= sign
    return value if -_INT64 <= value < _INT64 else None


@dataclass(frozen=True)
class Occurrence:
    """One place the thread flag is set: ``argv[index]`` names it; its value starts at
    ``start`` in that argument, or is the next argument (``start`` None)."""

    index: int
    start: int | None
    value: str | None  # None: the flag is the last argument and has no value


@dataclass(frozen=True)
class Scan:
    occurrences: list[Occurrence]
    end: int  # where the flags end: the index of "--", or len(argv)
    dangling: int | None  # a flag at the very end that wants a value it does not have


def scan(argv: list[str]) -> Scan:
    """Read ``argv`` (the arguments after the program's name) as pflag does."""
    found: list[Occurrence] = []
    dangling = None
    i, n = 0, len(argv)
    while i < n:
        arg = argv[i]
        at, i = i, i + 1
        if len(arg) < 2 or arg[0] != "-":
            continue  # positional: pflag reads on (interspersed)
        if arg == "--":
            return Scan(found, at, None)
        if arg[1] == "-":
            name, equals, _ = arg[2:].partition("=")
            if equals or name not in LONG_WITH_VALUE:
                if name == THREAD_NAME:  # --udp-thread-num=N
                    found.append(Occurrence(at, len(name) + 3, arg[len(name) + 3 :]))
                continue
            value = argv[i] if i < n else None  # --name VALUE
            if value is None:
                dangling = at
            if name == THREAD_NAME:
                found.append(Occurrence(at, None, value))
            i += 1
            continue
        for pos in range(1, len(arg)):  # a cluster of shorthands
            letter, rest = arg[pos], arg[pos + 1 :]
            if len(rest) > 1 and rest[0] == "=":  # -x=VALUE, bool or not, ends the cluster
                value, start = rest[1:], pos + 2
            elif letter not in SHORT_WITH_VALUE:
                continue  # a bool shorthand: the cluster goes on
            elif rest:  # -xVALUE
                value, start = rest, pos + 1
            else:  # -x VALUE
                value, start = (argv[i] if i < n else None), None
                if value is None:
                    dangling = at
                i += 1
            if letter == THREAD_LETTER:
                found.append(Occurrence(at, start, value))
            break
    return Scan(found, n, dangling)


def _split(command: list[str] | None, args: list[str]) -> tuple[list[list[str]], int]:
    """Every argument as [field, text] in the order the container runs them, and the index
    of stunnerd's own name among them (-1: the image's ENTRYPOINT, which we cannot see).

    stunnerd is the first argument named stunnerd, so that ``tini -- stunnerd ...`` and
    ``env X=1 stunnerd ...`` read right; otherwise the command's first argument (a binary
    renamed in a custom image)."""
    tokens = [["command", a] for a in command or []] + [["args", a] for a in args]
    for index, (_, text) in enumerate(tokens):
        if _basename(text) == "stunnerd":
            return tokens, index
    return tokens, 0 if command else -1


def shell_wrapper(command: list[str] | None, args: list[str]) -> str | None:
    """The shell that runs stunnerd (``sh -c "stunnerd -u 4"``, ``tini -- sh /run.sh``),
    if any: stunnerd's flags are then in a script the guard cannot edit safely."""
    tokens, program = _split(command, args)
    if program < 0 or _basename(tokens[program][1]) != "stunnerd":
        program = len(tokens) - 1  # stunnerd not named: a shell anywhere hides it
    for _, text in tokens[: program + 1]:
        if not text.startswith("-") and _basename(text) in SHELLS:
            return _basename(text)
    return None


def thread_values(command: list[str] | None, args: list[str]) -> list[str | None]:
    """The raw value of every thread flag stunnerd reads, in order (None: missing)."""
    tokens, program = _split(command, args)
    return [o.value for o in scan([t for _, t in tokens[program + 1 :]]).occurrences]


def thread_fields(command: list[str] | None, args: list[str]) -> list[str]:
    """Which fields (``command``, ``args``) hold a thread flag."""
    tokens, program = _split(command, args)
    flags = tokens[program + 1 :]
    return list(dict.fromkeys(flags[o.index][0] for o in scan([t for _, t in flags]).occurrences))


def effective_threads(command: list[str] | None, args: list[str]) -> int | None:
    """The thread count stunnerd will use (the last occurrence wins); None when unset or
    not an int stunnerd accepts."""
    values = thread_values(command, args)
    return go_int(values[-1]) if values else None


def with_threads(
    command: list[str] | None, args: list[str], threads: int
) -> tuple[list[str] | None, list[str]]:
    """``(command, args)`` with every thread flag stunnerd reads set to ``threads``, each in
    its own spelling and place (``-wu4`` -> ``-wu2``); when there is none, the flag is
    added to ``args`` (or where the flags end: before ``--``, before a last flag still
    missing its value). Nothing else changes."""
    tokens, program = _split(command, args)
    head, flags = tokens[: program + 1], tokens[program + 1 :]
    found = scan([t for _, t in flags])
    value = str(threads)
    inserts: list[tuple[int, str, bool]] = []  # (position, text, belongs to the one before)
    for o in found.occurrences:
        if o.start is not None:
            flags[o.index][1] = flags[o.index][1][: o.start] + value
        elif o.value is not None:
            flags[o.index + 1][1] = value
        else:
            inserts.append((o.index + 1, value, True))
    if not found.occurrences:
        at = found.end if found.dangling is None else found.dangling
        inserts.append((at, f"{THREAD_FLAG}={threads}", False))
    for at, text, attached in inserts:
        # Inside command, or the missing value of a flag at command's end: command.
        before = flags[at - 1][0] if at > 0 else (head[-1][0] if head else "args")
        after = flags[at][0] if at < len(flags) else None
        field = "command" if after == "command" or (attached and before == "command") else "args"
        flags.insert(at, [field, text])
    out = head + flags
    new_command = [t for f, t in out if f == "command"] if command else None
    return new_command, [t for f, t in out if f == "args"]
