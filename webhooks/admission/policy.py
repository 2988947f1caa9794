"""The policy as pure functions on plain dicts (DESIGN.md "Policy").

A ``Shaper`` walks one workload's stunnerd container (a Pod/Deployment container, or a
Dataplane spec, which has the same resources/command/args fields) and its pod-level grace
period, rule by rule. What happens when a rule finds something off depends on its mode
and on the webhook:

    webhook    how        mode enforce                     mode warn
    ---------  ---------  -------------------------------  -------------------------
    mutate     MUTATE     change the desired object,       nothing (validate warns
                          explain it (warning+annotation)  on the final object)
    validate   STRICT     deny: the mutating webhook       warning
                          should have fixed it
    validate   TOLERANT   warning: the mutating call did   warning
                          not run (failed open), and the
                          object is admitted as it is
    validate   ADVISE     warning: the Pod webhook will    warning
                          fix the pods (operator-owned
                          Deployments are never mutated)

The validating webhook is STRICT or TOLERANT by ``Settings.fixableFindings``, which the
chart derives from the mutating webhook's failure policy: with ``Ignore`` a failed mutating
call admits the object unadjusted, and a validating call that then denied it would block
stunnerd pods on a guard hiccup (a rollout, one replica down) despite ``Ignore``.
Values that cannot be fixed (a quantity that does not parse) are denied by every webhook.
Independently of every mode, the guard never emits a request above its limit.

The grace period's "unset" is the apiserver's 30 on Pods and pod templates: its defaulting
runs before any webhook, so a Pod never arrives without one (``Shaper.grace``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from webhooks.admission import stunnerd
from webhooks.admission.quantities import quantity
from webhooks.admission.review import MAX_WARNING_CHARS
from webhooks.settings import Policy, Rule

MUTATE, STRICT, TOLERANT, ADVISE = "mutate", "strict", "tolerant", "advise"
RESOURCES = ("cpu", "memory")
# What the apiserver writes into every Pod and pod template without a grace period
# (k8s.io/api core/v1 DefaultTerminationGracePeriodSeconds, applied by SetDefaults_PodSpec
# before admission; seen in the captured bodies in tests/fixtures/admission/apiserver-v1.36).
API_DEFAULT_GRACE_SECONDS = 30


def format_cores(cores: Decimal) -> str:
    """CPU as Kubernetes writes it: 2, 1500m."""
    if cores == cores.to_integral_value():
        return str(int(cores))
    return f"{int(cores * 1000)}m"


# Values echoed in messages are cut: a denial must not grow with a hostile field.
MAX_SHOWN_CHARS = 80


def _cut(text: str) -> str:
    return text if len(text) <= MAX_SHOWN_CHARS else text[: MAX_SHOWN_CHARS - 3] + "..."


def show(value: Any) -> str:
    """A field value as a user wrote it in YAML: true, 500m, <unset>."""
    if value is None:
        return "<unset>"
    if isinstance(value, bool):
        return "true" if value else "false"
    return _cut(str(value))


@dataclass(frozen=True)
class Where:
    """A field as messages name it: ``full`` for the changes annotation and denials, and
    ``brief`` for a warning that would not fit its 120 characters otherwise: a container by
    index instead of by name (a name may have 63 characters). ``where + ".x"`` extends
    both; ``str(where)`` is the full path."""

    full: str
    brief: str

    def __str__(self) -> str:
        return self.full

    def __add__(self, suffix: str) -> Where:
        return Where(self.full + suffix, self.brief + suffix)


def as_where(where: Where | str) -> Where:
    return where if isinstance(where, Where) else Where(where, where)


def container_path(prefix: str, index: int, container: dict) -> Where:
    """``spec.containers[stunner-daemon]``: containers are keyed by name in Kubernetes;
    briefly ``spec.containers[0]``."""
    name = container.get("name")
    full = f"{prefix}[{name if isinstance(name, str) and name else index}]"
    return Where(full, f"{prefix}[{index}]")


Wording = Callable[[str], str]


def fitting(where: Where | str, *wordings: Wording) -> str:
    """The warning to give: the first wording (most detailed first) that fits in
    MAX_WARNING_CHARS, each tried with the full path and then with the brief one. Only a
    hostile name or value gets past the last; review.encode cuts that one."""
    where = as_where(where)
    paths = dict.fromkeys((where.full, where.brief))
    return first_that_fits([wording(path) for wording in wordings for path in paths])


def first_that_fits(texts: list[str]) -> str:
    """The first of ``texts`` that fits a warning, else the last (review.encode cuts it)."""
    return next((text for text in texts if len(text) <= MAX_WARNING_CHARS), texts[-1])


@dataclass
class Shaper:
    policy: Policy
    how: str  # MUTATE, STRICT, TOLERANT or ADVISE
    subject: str  # "Pod media/udp-gateway-..." for messages
    changes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    denials: list[str] = field(default_factory=list)

    # ------------------------------------------------------------------ verdict vocabulary

    def propose(
        self, name: str, rule: Rule, where: Where | str, before: Any, after: Any, why: str
    ) -> bool:
        """A rule wants ``where`` to go from ``before`` to ``after``. True when the caller
        should apply it to the desired object.

        The changes annotation keeps the whole story (full path, before, after, rule and
        reason); a warning says what changed in words that fit (``fitting``): the reason,
        then the old value, then the new one are left out only when a long container name
        or namespace would not leave room for them even with the container by index."""
        if not rule.on:
            return False
        where = as_where(where)
        was, now = show(before), show(after)
        if self.how == MUTATE:
            if not rule.enforced:
                return False
            self.changes.append(f"{where.full}: {was} -> {now} ({name}: {why})")
            wordings = [
                lambda at: f"stunner-guard set {at}={now} ({name})",
                lambda at: f"stunner-guard changed {at} ({name})",
            ]
            if before is not None:
                wordings.insert(0, lambda at: f"stunner-guard set {at}={now}, was {was} ({name})")
            self.say(where, *wordings)
            return True
        if self.how == STRICT and rule.enforced:
            self.denials.append(
                f"{self.subject}: {where.full} is {was}: {why}, expected {now} "
                f"(rule {name}, mode enforce)"
            )
        elif self.how == ADVISE and rule.enforced:
            # Applied to the validating webhook's scratch copy only, so that later rules
            # (threads from the capped CPU limit) advise what the pods will really get.
            self.say(
                where,
                lambda at: f"pods will get {at}={now} ({name}: {why})",
                lambda at: f"pods will get {at}={now} ({name})",
                lambda at: f"pods will get a changed {at} ({name})",
            )
            return True
        elif self.how == TOLERANT and rule.enforced:
            # Applied to the scratch copy too: later findings are what mutation would add.
            self.say(
                where,
                lambda at: (
                    f"not adjusted (mutation did not run): {at} is {was}, want {now} ({name})"
                ),
                lambda at: f"not adjusted: {at} is {was}, want {now} ({name})",
                lambda at: f"not adjusted: {at}, want {now} ({name})",
                lambda at: f"not adjusted: {at} ({name})",
            )
            return True
        else:
            self.say(
                where,
                lambda at: f"{at} is {was}: {why}, want {now} ({name})",
                lambda at: f"{at} is {was}, want {now} ({name})",
                lambda at: f"{at}: want {now} ({name})",
                lambda at: f"{at} is off ({name})",
            )
        return False

    def say(self, where: Where | str, *wordings: Wording) -> None:
        """Warn, in the first of ``wordings`` that fits (``fitting``)."""
        self.warnings.append(fitting(where, *wordings))

    def deny(self, where: Where | str, value: Any, why: str, rule: str) -> None:
        self.denials.append(f"{self.subject}: {where} is {_cut(repr(value))}: {why} (rule {rule})")

    # ------------------------------------------------------------------ resources

    def resources(self, container: dict, where: Where | str) -> Decimal | None:
        """Shape requests and limits; return the CPU limit (cores) the pod will run with."""
        p = self.policy
        if not any(
            r.on for r in (p.requestsPresent, p.requestsMinimal, p.limitsPresent, p.limitsSane)
        ):
            return quantity(get_in(container, "resources", "limits", "cpu"))
        limits = {r: self._one_resource(container, where, r) for r in RESOURCES}
        return limits["cpu"]

    def _one_resource(self, container: dict, where: Where | str, r: str) -> Decimal | None:
        p = self.policy
        where = as_where(where)
        req_at, lim_at = where + f".resources.requests.{r}", where + f".resources.limits.{r}"
        req_raw = get_in(container, "resources", "requests", r)
        lim_raw = get_in(container, "resources", "limits", r)
        req, lim = quantity(req_raw), quantity(lim_raw)
        bad = False
        for at, raw, parsed in ((req_at, req_raw, req), (lim_at, lim_raw, lim)):
            if raw is not None and parsed is None:
                self.deny(at, raw, "not a non-negative Kubernetes quantity", "quantity syntax")
                bad = True
        if bad:
            return None

        def put(kind: str, raw: Any) -> Decimal:
            _set(container, raw, "resources", kind, r)
            return quantity(raw)

        limit_max = getattr(p.limitsSane, f"max{r.capitalize()}")
        request_max = getattr(p.requestsMinimal, f"max{r.capitalize()}")
        if lim is None:
            default = getattr(p.limitsPresent, r)
            if self.propose(
                "limitsPresent", p.limitsPresent, lim_at, None, default, "missing limit"
            ):
                lim_raw, lim = default, put("limits", default)
        if lim is not None and lim > quantity(limit_max):
            if self.propose(
                "limitsSane",
                p.limitsSane,
                lim_at,
                lim_raw,
                limit_max,
                f"above the {limit_max} maximum",
            ):
                lim_raw, lim = limit_max, put("limits", limit_max)
        if req is None:
            default = getattr(p.requestsPresent, r)
            # A filled-in request never exceeds the limit the container has.
            if lim is not None and quantity(default) > lim:
                default = lim_raw
            why = "HPA needs a CPU request" if r == "cpu" else "missing request"
            if self.propose("requestsPresent", p.requestsPresent, req_at, None, default, why):
                req_raw, req = default, put("requests", default)
        if req is not None and req > quantity(request_max):
            if self.propose(
                "requestsMinimal",
                p.requestsMinimal,
                req_at,
                req_raw,
                request_max,
                f"above the {request_max} maximum; scale out, not up",
            ):
                req_raw, req = request_max, put("requests", request_max)
        if req is not None and lim is not None and req > lim:
            # limit >= request always: raise the limit to the request when the maximum
            # allows it (the request is what the scheduler and the HPA use), else bring the
            # request down to the capped limit.
            ceiling = quantity(limit_max) if p.limitsSane.on else req
            if req <= ceiling:
                if self.propose(
                    "limitsSane", p.limitsSane, lim_at, lim_raw, req_raw, "limit below request"
                ):
                    lim_raw, lim = req_raw, put("limits", req_raw)
            elif self.propose(
                "limitsSane", p.limitsSane, req_at, req_raw, lim_raw, "request above limit"
            ):
                req_raw, req = lim_raw, put("requests", lim_raw)
        return lim

    # ------------------------------------------------------------------ threads

    def threads(
        self,
        container: dict,
        where: Where | str,
        cpu_limit: Decimal | None,
        operator_defaults: bool = False,
    ) -> None:
        """``--udp-thread-num`` = min(max, perCore x CPU limit), at least 1, wherever stunnerd
        reads it: ``command[1:]`` then ``args``, the last occurrence winning (stunnerd.py).
        Every occurrence is rewritten in place, so none is left to override the others.
        ``operator_defaults``: a Dataplane, whose unset (or empty) command and args the
        operator renders as ``stunnerd`` and ``-w --udp-thread-num=16``."""
        rule = self.policy.listenerThreads
        if not rule.on:
            return
        where = as_where(where)
        if cpu_limit is None:
            want = rule.max
        else:
            want = max(1, min(rule.max, int(Decimal(rule.perCore) * cpu_limit)))
        command = container.get("command")
        command = command if _str_list(command) and command else None
        args = container.get("args")
        if args is not None and not _str_list(args):
            self.deny(where + ".args", args, "not a list of strings", "listenerThreads")
            return
        # An empty list is no list: kubelet and the operator both fall back to the default.
        args = args or None
        if operator_defaults:
            command = command or stunnerd.OPERATOR_DEFAULT_COMMAND
            args = args or stunnerd.OPERATOR_DEFAULT_ARGS
        if command is None and args is None:
            # Adding args would replace the image's CMD, whose flags we can't see.
            self.say(
                where,
                lambda at: f"{at}: no command/args; cannot check --udp-thread-num (want {want})",
            )
            return
        shell = stunnerd.shell_wrapper(command, args or [])
        if shell is not None:
            # Editing a script or appending to a shell's argv would break the container.
            self.say(
                where,
                lambda at: (
                    f"{at}: stunnerd runs under {shell}; "
                    f"cannot check --udp-thread-num (want {want})"
                ),
            )
            return
        current = stunnerd.thread_values(command, args or [])
        if current and all(stunnerd.go_int(v) == want for v in current):
            return
        new_command, new_args = stunnerd.with_threads(command, args or [], want)
        fields = stunnerd.thread_fields(command, args or []) or [
            "command" if new_command != command else "args"
        ]
        now = ",".join(show(v) for v in current) if current else None
        why = (
            f"{rule.perCore}/core x CPU limit {format_cores(cpu_limit)}, max {rule.max}"
            if cpu_limit is not None
            else f"no CPU limit: max {rule.max}"
        )
        at = where + f".{'+'.join(fields)} --udp-thread-num"
        if self.propose("listenerThreads", rule, at, now, want, why):
            if new_command != command:
                container["command"] = new_command
            if new_args != (args or []):
                container["args"] = new_args

    # ------------------------------------------------------------------ grace period

    def grace(self, spec: dict, where: Where | str, pod_spec: bool = True) -> int | None:
        """terminationGracePeriodSeconds within min..max; the default where unset.

        On a Pod or a pod template (``pod_spec``) the apiserver's defaulting fills in 30
        (API_DEFAULT_GRACE_SECONDS) before any mutating webhook runs, so "unset" never
        arrives there: 30 is read as unset and gets the default, not just the minimum.
        Nothing tells an explicit 30 from the filled-in one; with the default minimum
        (600) an explicit 30 would be raised anyway, so only the value it ends at differs
        (the default, 3600, instead of the minimum). A Dataplane is a CRD without that
        defaulting: its 30 is the user's, and is moved into range like any other value."""
        rule = self.policy.gracePeriod
        at = as_where(where) + ".terminationGracePeriodSeconds"
        value = spec.get("terminationGracePeriodSeconds")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            self.deny(at, value, "not an integer number of seconds", "gracePeriod")
            return None
        want, before = None, value
        if value is None:
            want, why = rule.default, "unset"
        elif pod_spec and value == API_DEFAULT_GRACE_SECONDS and value != rule.default:
            want, why = rule.default, "the apiserver's default, read as unset"
            before = f"{value} (API default)"
        elif value < rule.min:
            want, why = rule.min, f"below {rule.min}s: idle TURN allocations live 10 min"
        elif value > rule.max:
            want, why = rule.max, f"above the {rule.max}s maximum"
        if want is not None and self.propose("gracePeriod", rule, at, before, want, why):
            spec["terminationGracePeriodSeconds"] = want
            return want
        return value

    # ------------------------------------------------------------------ whole container

    def container(
        self, container: dict, where: Where | str, operator_defaults: bool = False
    ) -> None:
        cpu_limit = self.resources(container, where)
        self.threads(container, where, cpu_limit, operator_defaults)


# ---------------------------------------------------------------------- dict helpers


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def get_in(obj: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def _set(obj: dict, value: Any, *path: str) -> None:
    for key in path[:-1]:
        if not isinstance(obj.get(key), dict):
            obj[key] = {}
        obj = obj[key]
    obj[path[-1]] = value
