"""All configuration, read once at startup and passed explicitly.

Two sources:
- the policy file (YAML, path in ``STUNNER_GUARD_POLICY_FILE``; the Helm chart renders it
  from ``.Values.policy.rules``, ``.Values.policy.drain`` and ``.Values.census`` into a
  ConfigMap) over the built-in defaults below, which come from STUNner's own scaling
  guidance (DESIGN.md "Policy");
- environment variables for everything about where the service runs.

An invalid policy file stops startup with a ``PolicyError`` naming the offending key.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

from webhooks.admission.quantities import quantity

MODES = ("enforce", "warn", "off")
# A body over maxBodyBytes but at most this many times it is read and dropped before the 413
# goes out: a client still sending when the connection closes sees a reset, not the 413.
# Anything larger is cut off.
DISCARD_OVERSIZED_FACTOR = 4
FIXABLE_FINDINGS = ("warn", "deny")
ENFORCE, WARN, OFF = MODES

REPO_ROOT = Path(__file__).resolve().parent.parent


class PolicyError(ValueError):
    """The policy file cannot be used; the message names the key."""


# --------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class Rule:
    """One policy rule: ``enforce`` mutates to comply and denies what cannot be fixed,
    ``warn`` only adds admission warnings, ``off`` skips the rule."""

    mode: str = ENFORCE

    @property
    def on(self) -> bool:
        return self.mode != OFF

    @property
    def enforced(self) -> bool:
        return self.mode == ENFORCE


@dataclass(frozen=True)
class RequestsPresent(Rule):
    """Fill in missing requests: the HPA cannot compute utilization without a CPU request."""

    cpu: str = "500m"
    memory: str = "128Mi"


@dataclass(frozen=True)
class RequestsMinimal(Rule):
    """Cap requests: scale out, not up; big requests defeat the HPA."""

    maxCpu: str = "1"
    maxMemory: str = "512Mi"


@dataclass(frozen=True)
class LimitsPresent(Rule):
    """Fill in missing limits."""

    cpu: str = "2"
    memory: str = "512Mi"


@dataclass(frozen=True)
class LimitsSane(Rule):
    """Cap limits. Independently of every mode, no emitted request ever exceeds its limit."""

    maxCpu: str = "2"
    maxMemory: str = "2Gi"


@dataclass(frozen=True)
class ListenerThreads(Rule):
    """``--udp-thread-num`` = min(max, perCore x CPU limit in cores), at least 1.
    2 cores <-> 16 threads is STUNner's default pairing."""

    max: int = 16
    perCore: int = 8


@dataclass(frozen=True)
class GracePeriod(Rule):
    """``terminationGracePeriodSeconds``: at least the 10-minute TURN allocation lifetime so
    idle allocations can expire while the pod drains. ``default`` replaces an unset one,
    and on Pods and pod templates the apiserver's own default, 30 (policy.py Shaper.grace)."""

    default: int = 3600
    min: int = 600
    max: int = 14400


@dataclass(frozen=True)
class Policy:
    requestsPresent: RequestsPresent = field(default_factory=RequestsPresent)
    requestsMinimal: RequestsMinimal = field(default_factory=RequestsMinimal)
    limitsPresent: LimitsPresent = field(default_factory=LimitsPresent)
    limitsSane: LimitsSane = field(default_factory=LimitsSane)
    listenerThreads: ListenerThreads = field(default_factory=ListenerThreads)
    gracePeriod: GracePeriod = field(default_factory=GracePeriod)
    # preStop httpGet to the drain endpoint, injected at Pod CREATE.
    drainHook: Rule = field(default_factory=Rule)
    # Dataplane.spec.enableMetricsEndpoint: the drain reads stunner_allocations_active.
    metricsEndpoint: Rule = field(default_factory=Rule)
    # HPA: averageUtilization x CPU request must stay below the CPU limit.
    hpaFeasibility: Rule = field(default_factory=Rule)
    # Dataplane.spec.replicas other than nil/1 makes the operator fight the HPA.
    hpaReplicas: Rule = field(default_factory=lambda: Rule(WARN))


@dataclass(frozen=True)
class DrainSettings:
    """The drain endpoint (DESIGN.md "The drain (preStop) protocol"); policy file key
    ``drain:`` (Helm ``.Values.policy.drain``)."""

    # How often a held drain reads the pod's allocation count (at most one read per pod
    # per interval, however many duplicate calls wait on it).
    pollIntervalSeconds: float = 1.0
    # Answer this long before deletionTimestamp so stunnerd still gets SIGTERM time.
    marginSeconds: float = 5.0
    # stunnerd's metrics port and path (Dataplane.spec.enableMetricsEndpoint).
    metricsPort: int = 8080
    metricsPath: str = "/metrics"
    # One metrics read, connect to last byte; a slower endpoint is a failed read.
    scrapeTimeoutSeconds: float = 0.5
    # A larger metrics page is a failed read (stunnerd's is a few KiB).
    maxMetricsBytes: int = 1 << 20
    # Consecutive failed metric reads after which the drain gives up.
    maxFailedReads: int = 3
    # Held drain calls occupy gunicorn threads; calls beyond this cap get 503 at once.
    # gunicorn.conf.py sizes its thread pool as this plus threads kept for admission.
    maxConcurrent: int = 1000
    # How long a drain call waits for the pod watch to show a known pod's
    # deletionTimestamp (kubelet calls 50-120 ms after the delete) before one fresh API
    # read decides; also the longest wait for the watch's first list.
    confirmSeconds: float = 2.0


@dataclass(frozen=True)
class CensusSettings:
    """The census (DESIGN.md "The census"): keep controller.kubernetes.io/pod-deletion-cost
    on running stunnerd pods in step with their TURN allocations. Policy file key
    ``census:`` (Helm ``.Values.census``)."""

    # enforce: write the cost (one replica, the Lease holder); warn: compute it and show it
    # (/census, metrics) but write nothing; off. Off when not configured: writing needs the
    # RBAC and the ValidatingAdmissionPolicy the Helm chart installs with census.mode.
    mode: str = OFF
    # How often every running stunnerd pod's allocations are read (the HPA's default
    # scale-down stabilization window is 300 s: fresh enough).
    intervalSeconds: float = 30.0
    # At most one write per pod per this many seconds, empty <-> non-empty included.
    minPatchSeconds: float = 60.0
    # Writes over the whole fleet: at most this many per second after a burst of
    # writeBurst (every write is an apiserver update sent to every pod watcher).
    maxWritesPerSecond: float = 1.0
    writeBurst: int = 10
    # The coordination.k8s.io/v1 Lease in the guard's namespace that elects the one writer,
    # and client-go's leader-election timings (lease > renew deadline > 1.2 x retry).
    leaseName: str = "stunner-guard-census"
    leaseDurationSeconds: int = 15
    renewDeadlineSeconds: float = 10.0
    retryPeriodSeconds: float = 2.0

    @property
    def on(self) -> bool:
        return self.mode != OFF

    @property
    def writes(self) -> bool:
        return self.mode == ENFORCE


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    policy: Policy = field(default_factory=Policy)
    drain: DrainSettings = field(default_factory=DrainSettings)
    census: CensusSettings = field(default_factory=CensusSettings)
    # STUNNER_GUARD_POLICY_FILE: where policy came from (None: built-in defaults).
    policyFile: str | None = None
    # STUNNER_GUARD_CERT_FILE / STUNNER_GUARD_KEY_FILE: serving certificate and key.
    certFile: str = str(REPO_ROOT / "certs" / "tls.crt")
    keyFile: str = str(REPO_ROOT / "certs" / "tls.key")
    # STUNNER_GUARD_CA_FILE: the CA that signed the serving certificate (the webhooks'
    # caBundle); default ca.crt next to the certificate, as both the chart's Secret and
    # cert-manager's carry it. Read only for its expiry metric.
    caFile: str = str(REPO_ROOT / "certs" / "ca.crt")
    # STUNNER_GUARD_DRAIN_HOST / STUNNER_GUARD_DRAIN_PORT: where kubelet reaches the drain
    # endpoint. kubelet resolves the preStop host on the node, not through cluster DNS, so
    # this must be an IP: the guard Service's ClusterIP. When unset, they are read from the
    # <SERVICE>_SERVICE_HOST/_PORT variables Kubernetes injects for the Service named in
    # STUNNER_GUARD_SERVICE_NAME. Without a host, preStop injection is skipped (warning).
    drainHost: str | None = None
    drainPort: int = 443
    # STUNNER_GUARD_SERVICE_NAME: the guard's own Service (set by the Helm chart). When set,
    # the drain host must be found, or the guard reports not ready.
    serviceName: str | None = None
    # STUNNER_GUARD_NAMESPACE: the guard's own namespace (from the downward API).
    namespace: str = "stunner-guard"
    # STUNNER_GUARD_WATCH_NAMESPACES: comma-separated namespaces whose pods may drain;
    # empty means all namespaces.
    watchNamespaces: tuple[str, ...] = ()
    # STUNNER_GUARD_DATAPLANE: the Dataplane the HPA replicas rule reads.
    dataplaneName: str = "default"
    # STUNNER_GUARD_MAX_BODY_BYTES: larger AdmissionReview bodies get HTTP 413.
    maxBodyBytes: int = 3 * 1024 * 1024
    # STUNNER_GUARD_FIXABLE_FINDINGS: what the validating webhook does with a finding the
    # mutating webhook fixes in enforce mode (it sees one only when the mutating call did
    # not run: it failed open). "warn" (with the mutating failurePolicy Ignore: an object
    # the guard could not adjust is admitted as it is, as Ignore promises) or "deny" (with
    # Fail: nothing unadjusted gets in). The chart sets it from the mutating failurePolicy.
    fixableFindings: str = "warn"
    # STUNNER_GUARD_KUBE_TIMEOUT_SECONDS: per API call; the webhook's own timeout is short.
    kubeTimeoutSeconds: float = 2.0
    # STUNNER_GUARD_REQUEST_TIMEOUT_SECONDS: a connection must deliver its TLS handshake and
    # a whole request (head and body) within this long of its first byte, or it is closed
    # (webhooks/serving.py). The apiserver, kubelet and Prometheus send a request at once.
    requestTimeoutSeconds: float = 10.0

    def watches(self, namespace: str) -> bool:
        return not self.watchNamespaces or namespace in self.watchNamespaces


# --------------------------------------------------------------------------- loading


def _quantity(value: Any, where: str) -> Decimal:
    parsed = quantity(value)
    if parsed is None:
        raise PolicyError(f"{where}: {value!r} is not a non-negative Kubernetes quantity")
    return parsed


def _build(cls: type, raw: Any, where: str, base: Any) -> Any:
    """Overlay the mapping ``raw`` on the dataclass instance ``base``; unknown keys and
    wrongly typed values are errors naming the key."""
    if raw is None:
        return base
    if not isinstance(raw, dict):
        raise PolicyError(f"{where}: expected a mapping, got {type(raw).__name__}")
    known = {f.name: f for f in fields(cls)}
    changes: dict[str, Any] = {}
    for key, value in raw.items():
        path = f"{where}.{key}"
        if key not in known:
            raise PolicyError(f"{path}: unknown key (known: {', '.join(sorted(known))})")
        current = getattr(base, key)
        if key == "mode":
            if value not in MODES:
                raise PolicyError(f"{path}: {value!r} is not one of {'|'.join(MODES)}")
        elif hasattr(current, "__dataclass_fields__"):
            value = _build(type(current), value, path, current)
        elif isinstance(current, bool):
            if not isinstance(value, bool):
                raise PolicyError(f"{path}: {value!r} is not true/false")
        elif isinstance(current, int):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise PolicyError(f"{path}: {value!r} is not a non-negative integer")
        elif isinstance(current, float):
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise PolicyError(f"{path}: {value!r} is not a non-negative number")
            value = float(value)
        elif isinstance(current, str):
            if isinstance(value, bool) or not isinstance(value, str | int | float):
                raise PolicyError(f"{path}: {value!r} is not a string")
            value = str(value)
            if key.lower().endswith(("cpu", "memory")):
                _quantity(value, path)
        changes[key] = value
    return replace(base, **changes)


def _check_policy(p: Policy) -> None:
    """Cross-field rules: the defaults must themselves satisfy the bounds, otherwise the
    guard would emit objects its own validation denies."""
    q = _quantity
    pairs = [
        (
            "rules.requestsPresent.cpu",
            p.requestsPresent.cpu,
            "rules.requestsMinimal.maxCpu",
            p.requestsMinimal.maxCpu,
        ),
        (
            "rules.requestsPresent.memory",
            p.requestsPresent.memory,
            "rules.requestsMinimal.maxMemory",
            p.requestsMinimal.maxMemory,
        ),
        (
            "rules.limitsPresent.cpu",
            p.limitsPresent.cpu,
            "rules.limitsSane.maxCpu",
            p.limitsSane.maxCpu,
        ),
        (
            "rules.limitsPresent.memory",
            p.limitsPresent.memory,
            "rules.limitsSane.maxMemory",
            p.limitsSane.maxMemory,
        ),
        (
            "rules.requestsMinimal.maxCpu",
            p.requestsMinimal.maxCpu,
            "rules.limitsSane.maxCpu",
            p.limitsSane.maxCpu,
        ),
        (
            "rules.requestsMinimal.maxMemory",
            p.requestsMinimal.maxMemory,
            "rules.limitsSane.maxMemory",
            p.limitsSane.maxMemory,
        ),
    ]
    for low_key, low, high_key, high in pairs:
        if q(low, low_key) > q(high, high_key):
            raise PolicyError(f"{low_key}: {low} exceeds {high_key} ({high})")
    for key in ("requestsPresent.cpu", "limitsPresent.cpu", "limitsSane.maxCpu"):
        rule, attr = key.split(".")
        if q(getattr(getattr(p, rule), attr), key) <= 0:
            raise PolicyError(f"rules.{key}: must be greater than 0")
    g = p.gracePeriod
    if not g.min <= g.default <= g.max:
        raise PolicyError(
            f"rules.gracePeriod.default: {g.default} is outside min..max ({g.min}..{g.max})"
        )
    t = p.listenerThreads
    if t.max < 1 or t.perCore < 1:
        raise PolicyError("rules.listenerThreads: max and perCore must be at least 1")


def _check_drain(d: DrainSettings) -> None:
    if d.pollIntervalSeconds <= 0:
        raise PolicyError("drain.pollIntervalSeconds: must be greater than 0")
    if d.scrapeTimeoutSeconds <= 0:
        raise PolicyError("drain.scrapeTimeoutSeconds: must be greater than 0")
    if not 1 <= d.metricsPort <= 65535:
        raise PolicyError(f"drain.metricsPort: {d.metricsPort} is not a port number")
    if d.maxFailedReads < 1:
        raise PolicyError("drain.maxFailedReads: must be at least 1")
    if not d.metricsPath.startswith("/"):
        raise PolicyError(f"drain.metricsPath: {d.metricsPath!r} must start with /")


_LEASE_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


def _check_census(c: CensusSettings) -> None:
    if c.intervalSeconds <= 0:
        raise PolicyError("census.intervalSeconds: must be greater than 0")
    if c.maxWritesPerSecond <= 0:
        raise PolicyError("census.maxWritesPerSecond: must be greater than 0")
    if c.writeBurst < 1:
        raise PolicyError("census.writeBurst: must be at least 1")
    if not _LEASE_NAME.fullmatch(c.leaseName):
        raise PolicyError(f"census.leaseName: {c.leaseName!r} is not a DNS subdomain name")
    if not c.leaseDurationSeconds > c.renewDeadlineSeconds > 1.2 * c.retryPeriodSeconds > 0:
        raise PolicyError(
            "census: leaseDurationSeconds > renewDeadlineSeconds > 1.2 x retryPeriodSeconds > 0 "
            "is needed, or two replicas could write at once"
        )


DOCUMENT_KEYS = ("census", "drain", "rules")


def load_document(doc: Any, source: str = "policy") -> tuple[Policy, DrainSettings, CensusSettings]:
    """Everything a parsed policy document sets (``rules:``, ``drain:``, ``census:``)."""
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise PolicyError(f"{source}: expected a mapping with keys {', '.join(DOCUMENT_KEYS)}")
    unknown = set(doc) - set(DOCUMENT_KEYS)
    if unknown:
        raise PolicyError(f"{sorted(unknown)[0]}: unknown key (known: {', '.join(DOCUMENT_KEYS)})")
    policy = _build(Policy, doc.get("rules"), "rules", Policy())
    drain = _build(DrainSettings, doc.get("drain"), "drain", DrainSettings())
    census = _build(CensusSettings, doc.get("census"), "census", CensusSettings())
    _check_policy(policy)
    _check_drain(drain)
    _check_census(census)
    return policy, drain, census


def load_policy_document(doc: Any, source: str = "policy") -> tuple[Policy, DrainSettings]:
    """Policy and drain settings from a parsed policy document (the whole document is
    checked, ``census:`` too: see load_document)."""
    policy, drain, _ = load_document(doc, source)
    return policy, drain


def _read_document(path: str) -> Any:
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise PolicyError(f"policy file {path}: {err.strerror}") from err
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise PolicyError(f"policy file {path}: not YAML: {err}") from err


def load_policy_file(path: str) -> tuple[Policy, DrainSettings]:
    return load_policy_document(_read_document(path), path)


def load_file(path: str) -> tuple[Policy, DrainSettings, CensusSettings]:
    return load_document(_read_document(path), path)


def _env_int(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError as err:
        raise PolicyError(f"{name}: {raw!r} is not an integer") from err


def _env_choice(env: dict[str, str], name: str, choices: tuple[str, ...], default: str) -> str:
    raw = env.get(name) or default
    if raw not in choices:
        raise PolicyError(f"{name}: {raw!r} is not one of {'|'.join(choices)}")
    return raw


def _env_seconds(env: dict[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        value = float(raw)
    except ValueError as err:
        raise PolicyError(f"{name}: {raw!r} is not a number") from err
    if not value > 0:
        raise PolicyError(f"{name}: {raw!r} must be greater than 0")
    return value


def _service_env_prefix(service_name: str) -> str:
    # Kubernetes names the injected variables after the Service: upper case, '-' -> '_'.
    return service_name.upper().replace("-", "_")


def from_env(env: dict[str, str] | None = None) -> Settings:
    """Settings from the environment (and the policy file it names)."""
    env = dict(os.environ if env is None else env)
    policy_file = env.get("STUNNER_GUARD_POLICY_FILE") or None
    policy, drain, census = (
        load_file(policy_file) if policy_file else (Policy(), DrainSettings(), CensusSettings())
    )

    drain_host = env.get("STUNNER_GUARD_DRAIN_HOST") or None
    drain_port = _env_int(env, "STUNNER_GUARD_DRAIN_PORT", 0)
    service = env.get("STUNNER_GUARD_SERVICE_NAME")
    if service:
        prefix = _service_env_prefix(service)
        drain_host = drain_host or env.get(f"{prefix}_SERVICE_HOST") or None
        drain_port = drain_port or _env_int(env, f"{prefix}_SERVICE_PORT", 0)

    defaults = Settings()
    watch = tuple(
        ns.strip() for ns in env.get("STUNNER_GUARD_WATCH_NAMESPACES", "").split(",") if ns.strip()
    )
    kube_timeout = _env_seconds(
        env, "STUNNER_GUARD_KUBE_TIMEOUT_SECONDS", defaults.kubeTimeoutSeconds
    )
    request_timeout = _env_seconds(
        env, "STUNNER_GUARD_REQUEST_TIMEOUT_SECONDS", defaults.requestTimeoutSeconds
    )
    # A census write decided just before the renew deadline lands up to two API tries
    # later: the lease must outlast both, or a cut-off leader could still write when
    # another replica has taken over.
    if census.mode != OFF and not (
        census.renewDeadlineSeconds + 2 * kube_timeout < census.leaseDurationSeconds
    ):
        raise PolicyError(
            f"census.leaseDurationSeconds ({census.leaseDurationSeconds}) must exceed "
            f"census.renewDeadlineSeconds ({census.renewDeadlineSeconds}) + 2 x "
            f"STUNNER_GUARD_KUBE_TIMEOUT_SECONDS ({kube_timeout}): two replicas could write"
        )
    cert_file = env.get("STUNNER_GUARD_CERT_FILE") or defaults.certFile
    return Settings(
        policy=policy,
        drain=drain,
        census=census,
        policyFile=policy_file,
        certFile=cert_file,
        caFile=env.get("STUNNER_GUARD_CA_FILE") or str(Path(cert_file).parent / "ca.crt"),
        keyFile=env.get("STUNNER_GUARD_KEY_FILE") or defaults.keyFile,
        drainHost=drain_host,
        drainPort=drain_port or defaults.drainPort,
        serviceName=service or None,
        namespace=env.get("STUNNER_GUARD_NAMESPACE") or defaults.namespace,
        watchNamespaces=watch,
        dataplaneName=env.get("STUNNER_GUARD_DATAPLANE") or defaults.dataplaneName,
        maxBodyBytes=_env_int(env, "STUNNER_GUARD_MAX_BODY_BYTES", defaults.maxBodyBytes),
        fixableFindings=_env_choice(
            env, "STUNNER_GUARD_FIXABLE_FINDINGS", FIXABLE_FINDINGS, defaults.fixableFindings
        ),
        kubeTimeoutSeconds=kube_timeout,
        requestTimeoutSeconds=request_timeout,
    )
