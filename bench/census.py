"""Census benchmark (``python -m bench census``): the real gunicorn server (gunicorn.conf.py)
running the census over 1,000 running stunnerd pods, and a simulation of which pods a
ReplicaSet scale-down removes with and without the guard's costs.

Everything is on loopback: the stand-in API server (1,000 running stunnerd pods carrying
the drain token label and the cost the census would have written: the steady state) and a
fake stunnerd fleet in its own process (1,000 metrics endpoints on 127.0.x.y, one port),
whose counts random-walk as calls start and end. One walk step is 30 s of calls (the
default census interval): each pod gets new calls at its own rate (a skewed fleet) and
each call ends with probability 30 s / CALL_SECONDS. Figures (printed, and written to
bench/out/census.json):

- census CPU per round: the worker's and its metrics reader's CPU over CPU_ROUNDS rounds
  at a CPU_INTERVAL interval, one walk step per round; as a share of one core at the
  default 30 s interval (target < 5%);
- writes: the writes the rules (hysteresis, minPatchSeconds) want per 30 s round of churn,
  budget aside (the walk simulated: the production-pace figure), and the writes the server
  made while rounds came every CPU_INTERVAL seconds (30 s of churn each: ten times the
  production pace) against its budget (writeBurst + maxWritesPerSecond x time);
- admission p99 at 200 req/s with the census running (ADMISSION_INTERVAL rounds, six times
  the default pace) against the same server with census.mode off, ABBA windows, ratio of
  medians (target <= 1.2x);
- victim quality (no server): 20 pods with skewed counts, scale down by 5, ranked as the
  ReplicaSet controller ranks them (k8s.io/kubernetes pkg/controller/controller_utils.go
  ActivePodsWithRanks, LogarithmicScaleDown on): allocations on the 5 removed pods with the
  guard's costs, without them, and the 5 emptiest, over VICTIM_TRIALS random fleets.

Durations can be shortened for a smoke run with CENSUS_BENCH_SHORT=1.
"""

from __future__ import annotations

import math
import os
import random
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.common import (
    OUT,
    REPO,
    child,
    children,
    cpu_seconds,
    gunicorn,
    hey,
    rows_table,
    write_json,
)
from tests.fake_stunnerd import FakeStunnerdFleet
from tests.standin_apiserver import StandinAPIServer, stunnerd_pod
from webhooks.lifecycle.census import level, wanted_cost

SHORT = os.environ.get("CENSUS_BENCH_SHORT") == "1"
PODS = 1000
NAMESPACE = "media"
CALL_SECONDS = 300  # mean TURN session length: a few minutes
STEP_SECONDS = 30  # one walk step: the default census interval of calls starting and ending
MEAN_CALLS = 12  # mean allocations per pod
CPU_INTERVAL = 3.0
CPU_ROUNDS = 4 if SHORT else 12
ADMISSION_INTERVAL = 5.0
RATE = 200  # admission requests per second
WINDOW_SECONDS = 5 if SHORT else 20
WINDOWS = "AB" if SHORT else "ABBAABBA"  # A: census off, B: census on
VICTIM_PODS, VICTIM_SCALE_DOWN, VICTIM_TRIALS = 20, 5, 200 if SHORT else 2000
BUDGET = {"maxWritesPerSecond": 1.0, "writeBurst": 10}
POD_REVIEW = (
    REPO
    / "tests/fixtures/admission/apiserver-v1.36/stunner"
    / "009-mutate-Pod-v1-CREATE-media-udp-gateway-8547c954bb-.json"
)


def pod_ip(i: int) -> str:
    return f"127.0.{1 + i // 250}.{1 + i % 250}"


def poisson(rng: random.Random, mean: float) -> int:
    """Knuth's method (means here are small)."""
    limit, k, p = math.exp(-mean), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


class Walk:
    """The fleet's calls: per pod an arrival rate (lognormal: a skewed fleet, a few pods
    nearly idle), each call ending with probability STEP_SECONDS / CALL_SECONDS a step."""

    def __init__(self, pods: int, seed: int = 11) -> None:
        self.rng = random.Random(seed)
        end = STEP_SECONDS / CALL_SECONDS
        weights = [self.rng.lognormvariate(0, 1.0) for _ in range(pods)]
        scale = MEAN_CALLS * end / statistics.mean(weights)
        self.arrivals = [w * scale for w in weights]
        self.end = end
        self.counts = [poisson(self.rng, a / end) for a in self.arrivals]

    def step(self) -> list[int]:
        ended = [sum(self.rng.random() < self.end for _ in range(n)) for n in self.counts]
        self.counts = [
            n - e + poisson(self.rng, a)
            for n, e, a in zip(self.counts, ended, self.arrivals, strict=True)
        ]
        return self.counts


# --------------------------------------------------------------------------- the fleet


def _serve_fleet(conn, pods: int) -> None:
    """Child process: the fake stunnerd pods and their walk, stepped when told."""
    walk = Walk(pods)
    with FakeStunnerdFleet() as fleet:
        first = fleet.add(pod_ip(0), 0, allocations=walk.counts[0])
        targets = [first] + [
            fleet.add(pod_ip(i), first.port, allocations=walk.counts[i]) for i in range(1, pods)
        ]
        conn.send((first.port, os.getpid(), list(walk.counts)))
        while (command := conn.recv()) != "stop":
            if command == "step":
                for target, n in zip(targets, walk.step(), strict=True):
                    target.allocations = n
                conn.send(None)


@contextmanager
def stepping(fleet, interval: float):
    """Steps the walk every ``interval`` seconds (one census round's worth of churn) from a
    thread of its own, while the body runs."""
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(interval):
            fleet.send("step")
            fleet.recv()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# --------------------------------------------------------------------------- the server


def _policy(metrics_port: int, mode: str, interval: float) -> dict:
    census = {"mode": mode, "intervalSeconds": interval, "minPatchSeconds": 2 * interval}
    return {"drain": {"metricsPort": metrics_port}, "census": census | BUDGET}


def _server(name: str, api: StandinAPIServer, policy: dict):
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}-policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    env = {
        "STUNNER_GUARD_POLICY_FILE": str(path),
        "KUBECONFIG": str(api.write_kubeconfig(OUT / f"{name}-kubeconfig")),
        "STUNNER_GUARD_NAMESPACE": "stunner-guard",
    }
    return gunicorn(name, env=env)


def _metric(server, name: str, **labels: str) -> float:
    """A sample's value from the server's /metrics (0 when absent)."""
    _, body = server.request("GET", "/metrics")
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def cpu_and_writes(api: StandinAPIServer, fleet, metrics_port: int) -> dict:
    """CPU per census round and writes, rounds every CPU_INTERVAL seconds."""
    with _server("census-cpu", api, _policy(metrics_port, "enforce", CPU_INTERVAL)) as server:
        worker = server.worker_pids()[0]
        rounds = "stunner_guard_census_round_duration_seconds_count"
        deadline = time.monotonic() + 30
        while _metric(server, rounds) < 1:  # leader, first round done
            if time.monotonic() > deadline:
                raise RuntimeError(f"no census round within 30 s; see {server.log}")
            time.sleep(0.2)
        processes = [worker, *children(worker)]  # the worker and its metrics reader
        skipped_name = "stunner_guard_census_writes_skipped_total"
        reasons = ("budget", "min_interval")
        cpu = sum(cpu_seconds(pid) for pid in processes)
        first_round, patches = _metric(server, rounds), len(api.patches)
        skipped_before = {r: _metric(server, skipped_name, reason=r) for r in reasons}
        started = time.monotonic()
        with stepping(fleet, CPU_INTERVAL):
            time.sleep(CPU_ROUNDS * CPU_INTERVAL)
        elapsed = time.monotonic() - started
        cpu = sum(cpu_seconds(pid) for pid in processes) - cpu
        done = _metric(server, rounds) - first_round
        writes = len(api.patches) - patches
        skipped = {r: _metric(server, skipped_name, reason=r) - skipped_before[r] for r in reasons}
    return {
        "rounds": done,
        "interval_seconds": CPU_INTERVAL,
        "cpu_seconds_per_round": cpu / max(done, 1),
        "cpu_share_at_30s": cpu / max(done, 1) / 30,
        "seconds": elapsed,
        "writes": writes,
        "writes_limit": BUDGET["writeBurst"] + BUDGET["maxWritesPerSecond"] * elapsed,
        "skipped": skipped,
    }


def churn_writes(steps: int = 200) -> dict:
    """The writes the rules want under the walk, budget aside: PODS pods in the steady
    state, one step of churn per 30 s round, hysteresis and minPatchSeconds (two rounds,
    as 60 s is at 30 s) applied, every wanted write allowed by them made."""
    walk = Walk(PODS, seed=3)
    written = [level(n) for n in walk.counts]
    last = [-10] * PODS
    writes = crossings = 0
    for step in range(steps):
        for i, n in enumerate(walk.step()):
            wanted = wanted_cost(written[i], n)
            if wanted != written[i] and step - last[i] >= 2:
                crossings += (written[i] == 0) != (wanted == 0)
                writes += 1
                written[i], last[i] = wanted, step
    return {
        "pods": PODS,
        "rounds": steps,
        "writes_per_round": writes / steps,
        "writes_per_minute_at_30s": writes / steps * 2,
        "empty_crossings_share": crossings / max(writes, 1),
        "budget_per_minute": BUDGET["maxWritesPerSecond"] * 60,
    }


def admission(api: StandinAPIServer, fleet, metrics_port: int) -> dict:
    """Admission p99 at RATE req/s, census off (A) against on (B), ABBA."""
    windows: dict[str, list] = {"A": [], "B": []}
    for which in WINDOWS:
        mode = "enforce" if which == "B" else "off"
        name = f"census-admission-{mode}"
        with _server(name, api, _policy(metrics_port, mode, ADMISSION_INTERVAL)) as server:
            time.sleep(ADMISSION_INTERVAL)  # the census leads and runs its first round
            with stepping(fleet, ADMISSION_INTERVAL):
                load = hey(
                    f"{server.url}/mutate",
                    POD_REVIEW,
                    WINDOW_SECONDS,
                    20,
                    rate_per_worker=RATE / 20,
                )
            windows[which].append(load)
    a = statistics.median(w.p99_ms for w in windows["A"])
    b = statistics.median(w.p99_ms for w in windows["B"])
    return {
        "rate": RATE,
        "window_seconds": WINDOW_SECONDS,
        "census_interval_seconds": ADMISSION_INTERVAL,
        "off": [w.figures() | {"ok": w.ok} for w in windows["A"]],
        "on": [w.figures() | {"ok": w.ok} for w in windows["B"]],
        "p99_ratio": b / a,
    }


# --------------------------------------------------------------------------- victims


@dataclass
class SimPod:
    uid: str
    node: int
    ready_ago: float  # seconds since it became ready (and was created)
    allocations: int
    cost: int = 0


def _log_rank(seconds_ago: float) -> int:
    return int(math.log2(seconds_ago * 1e9)) if seconds_ago > 0 else -1  # Go: nanoseconds


def replicaset_victims(pods: list[SimPod], count: int) -> list[SimPod]:
    """The pods the ReplicaSet controller deletes first, ranked as ActivePodsWithRanks
    ranks running, ready, scheduled pods: lower pod-deletion-cost first; then more ready
    pods of the set on the same node; then more recently ready (on a log2 scale, ties by
    UID); restarts (none here); then newer creation (the same times here)."""
    on_node: dict[int, int] = {}
    for pod in pods:
        on_node[pod.node] = on_node.get(pod.node, 0) + 1

    def key(pod: SimPod) -> tuple:
        return (pod.cost, -on_node[pod.node], -_log_rank(pod.ready_ago), pod.uid)

    return sorted(pods, key=key)[:count]


def simulated_fleet(rng: random.Random) -> list[SimPod]:
    """20 pods on 7 nodes behind a load balancer with externalTrafficPolicy: Local (TURN
    keeps client addresses): each node gets an even share of new calls, split among its
    pods, so pods on crowded nodes get fewer. Pods came up over the last 6 hours (an HPA
    scaling out during the day); a young pod has had less time to gather calls. On top,
    each pod's mean is scaled by an exponential factor (a gamma-Poisson count: some pods
    hold a long conference or a busy tenant, some are nearly idle): skewed, as TURN pods'
    counts are."""
    nodes = 7
    placement = [rng.randrange(nodes) for _ in range(VICTIM_PODS)]
    per_node = {n: placement.count(n) for n in set(placement)}
    ages = [rng.uniform(60, 6 * 3600) for _ in range(VICTIM_PODS)]
    total_rate = VICTIM_PODS * MEAN_CALLS / CALL_SECONDS  # calls a second over the fleet
    pods = []
    for node, age in zip(placement, ages, strict=True):
        rate = total_rate / len(per_node) / per_node[node]
        mean = rate * CALL_SECONDS * (1 - math.exp(-age / CALL_SECONDS)) * rng.expovariate(1)
        now = poisson(rng, mean)
        before = max(0, now + rng.choice([-2, -1, 0, 1, 2]))  # the count a round ago
        pods.append(
            SimPod(f"{rng.getrandbits(64):016x}", node, age, now, wanted_cost(level(before), now))
        )
    return pods


def victims() -> dict:
    rng = random.Random(5)
    without, with_guard, ideal, example = [], [], [], None
    for trial in range(VICTIM_TRIALS):
        pods = simulated_fleet(rng)
        blind = [SimPod(p.uid, p.node, p.ready_ago, p.allocations) for p in pods]  # cost 0
        a = sum(p.allocations for p in replicaset_victims(blind, VICTIM_SCALE_DOWN))
        b = sum(p.allocations for p in replicaset_victims(pods, VICTIM_SCALE_DOWN))
        c = sum(sorted(p.allocations for p in pods)[:VICTIM_SCALE_DOWN])
        without.append(a)
        with_guard.append(b)
        ideal.append(c)
        if trial == 0:
            example = {
                "counts": sorted(p.allocations for p in pods),
                "without": sorted(p.allocations for p in replicaset_victims(blind, 5)),
                "with": sorted(p.allocations for p in replicaset_victims(pods, 5)),
            }
    return {
        "pods": VICTIM_PODS,
        "scale_down": VICTIM_SCALE_DOWN,
        "trials": VICTIM_TRIALS,
        "mean_allocations_removed_without": statistics.mean(without),
        "mean_allocations_removed_with": statistics.mean(with_guard),
        "mean_allocations_removed_ideal": statistics.mean(ideal),
        "example": example,
    }


# --------------------------------------------------------------------------- run


def run() -> dict:
    load_before = os.getloadavg()
    figures: dict = {"victims": victims(), "churn": churn_writes(), "loadavg_before": load_before}
    with child(_serve_fleet, PODS) as fleet, StandinAPIServer() as api:
        if not fleet.poll(120):
            raise RuntimeError("the fake stunnerd fleet did not start")
        metrics_port, _fleet_pid, counts = fleet.recv()
        for i, n in enumerate(counts):
            pod = stunnerd_pod(f"udp-gateway-{i:04d}", NAMESPACE, token=f"t{i:04d}", ip=pod_ip(i))
            if level(n):  # the steady state: the cost the census would have written
                pod["metadata"]["annotations"] = {
                    "controller.kubernetes.io/pod-deletion-cost": str(level(n))
                }
            api.put(pod)
        figures["cpu"] = cpu_and_writes(api, fleet, metrics_port)
        figures["admission"] = admission(api, fleet, metrics_port)
    figures["loadavg_after"] = os.getloadavg()
    return figures


def table(f: dict) -> str:
    cpu, adm, vic, churn = f["cpu"], f["admission"], f["victims"], f["churn"]
    windows = lambda runs: ", ".join(f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f}" for r in runs)  # noqa: E731
    rows = [
        (
            f"census CPU per round, {PODS} pods (worker + reader)",
            f"{cpu['cpu_seconds_per_round'] * 1000:.0f} ms = "
            f"{cpu['cpu_share_at_30s']:.1%} of a core at 30 s ({cpu['rounds']:.0f} rounds)",
            "< 5%",
        ),
        (
            f"writes the rules want, {churn['pods']} pods, budget aside (simulated)",
            f"{churn['writes_per_round']:.1f} a 30 s round = "
            f"{churn['writes_per_minute_at_30s']:.0f}/min "
            f"({churn['empty_crossings_share']:.0%} empty <-> non-empty)",
            f"budget {churn['budget_per_minute']:.0f}/min",
        ),
        (
            f"writes made, a round every {cpu['interval_seconds']:g} s (10x the churn pace)",
            f"{cpu['writes']} in {cpu['seconds']:.0f} s (skipped: "
            f"{cpu['skipped']['budget']:.0f} budget, {cpu['skipped']['min_interval']:.0f} "
            "min interval)",
            f"<= burst + rate x time = {cpu['writes_limit']:.0f}",
        ),
        (f"admission p50 / p99, census off ({RATE} req/s)", windows(adm["off"]) + " ms", ""),
        (
            f"admission p50 / p99, census on, rounds every {adm['census_interval_seconds']:g} s",
            windows(adm["on"]) + " ms",
            "",
        ),
        ("admission p99 ratio (median on / median off)", f"{adm['p99_ratio']:.2f}x", "<= 1.2x"),
        (
            f"allocations on the {vic['scale_down']} pods a scale-down removes, of {vic['pods']} "
            "(mean)",
            f"without costs {vic['mean_allocations_removed_without']:.1f}, with the guard's "
            f"{vic['mean_allocations_removed_with']:.1f} (the 5 emptiest: "
            f"{vic['mean_allocations_removed_ideal']:.1f}; {vic['trials']} fleets)",
            "",
        ),
        (
            "  one fleet: counts / removed without / with",
            f"{vic['example']['counts']} / {vic['example']['without']} / {vic['example']['with']}",
            "",
        ),
        (
            "load average before / after",
            " / ".join(
                ", ".join(f"{x:.2f}" for x in f[k]) for k in ("loadavg_before", "loadavg_after")
            ),
            "",
        ),
    ]
    return rows_table("census benchmark", rows)


def main() -> int:
    figures = run()
    print(table(figures))
    for window in figures["admission"]["off"] + figures["admission"]["on"]:
        if not window["ok"]:
            print("admission window failed:", window["statuses"], *window["error_kinds"])
    print(f"figures: {write_json('census', figures)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
