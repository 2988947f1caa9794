"""The stunner-guard Grafana dashboard, as code: ``make dashboard`` writes
charts/stunner-guard/files/grafana-dashboard.json, the one file that Grafana imports and
that the chart's ConfigMap carries (grafanaDashboard.enabled).

Built with grafana-foundation-sdk (Grafana Labs' generated types and builders, no runtime
dependencies, pinned in pyproject.toml's dev extra). The generated JSON is committed, and
tests/test_observability.py checks that this module still writes exactly that file, that
every query parses with promtool, and that every metric it names is one the guard's
/metrics page or the kube-apiserver exports.

    python -m observability.dashboard [--check]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import bargauge, dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import (
    DataSourceRef,
    Threshold,
    ThresholdsMode,
    ValueMap,
    ValueMappingResult,
    VariableOption,
)

REPO = Path(__file__).resolve().parent.parent
OUTPUT = REPO / "charts" / "stunner-guard" / "files" / "grafana-dashboard.json"

DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
# The kube-apiserver names each webhook; the chart's all end in this.
GUARD_WEBHOOKS = 'name=~".+\\\\.stunner-guard\\\\.l7mp\\\\.io"'
# Drains are rare and long: their histograms are read over an hour, not a scrape or two.
DRAIN_WINDOW = "1h"
# A census round runs every census.intervalSeconds (30 s): ten minutes hold about twenty.
CENSUS_WINDOW = "10m"


def query(expr: str, legend: str = "", instant: bool = False) -> prometheus.Dataquery:
    q = prometheus.Dataquery().expr(expr).legend_format(legend or "__auto")
    return q.instant() if instant else q.range()


def graph(title: str, description: str, unit: str, *queries: prometheus.Dataquery):
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .min(0)
        .span(12)
        .height(8)
        .legend(
            common_builders.VizLegendOptions()
            .show_legend(True)
            .display_mode(common.LegendDisplayMode.TABLE)
            .placement(common.LegendPlacement.BOTTOM)
            .calcs(["lastNotNull", "max"])
        )
    )
    for ref, q in zip("ABCDEFGH", queries, strict=False):
        panel = panel.with_target(q.ref_id(ref))
    return panel


def number(title: str, description: str, q: prometheus.Dataquery, unit: str = "none"):
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(4)
        .height(4)
        .with_target(q.ref_id("A"))
    )


def steps(*pairs: tuple[float | None, str]) -> dashboard.ThresholdsConfig:
    """Colours from each value up: (None, base colour), (value, colour)..."""
    return (
        dashboard.ThresholdsConfig()
        .mode(ThresholdsMode.ABSOLUTE)
        .steps([Threshold(value=value, color=color) for value, color in pairs])
    )


def states(*pairs: tuple[str, str, str]) -> list[ValueMap]:
    """Value mappings for a 0/1 gauge: (value, text, color)."""
    return [
        ValueMap(options={value: ValueMappingResult(text=text, color=color)})
        for value, text, color in pairs
    ]


def build() -> dashboard.Dashboard:
    d = (
        dashboard.Dashboard("stunner-guard")
        .uid("stunner-guard")
        .description(
            "STUNner's admission and drain webhooks: reviews, latency, denials, drains, "
            "certificates, the census (pod-deletion-cost). Metric names: webhooks/metrics.py."
        )
        .tags(["stunner", "stunner-guard", "admission-webhook"])
        .editable()
        .refresh("30s")
        .time("now-6h", "now")
        .timezone("browser")
        .with_variable(
            dashboard.DatasourceVariable("datasource")
            .label("Prometheus")
            .type("prometheus")
            .current(VariableOption(selected=True, text="Prometheus", value="prometheus"))
        )
    )

    d = d.with_row(dashboard.Row("Health"))
    d = d.with_panel(
        number(
            "Replicas up",
            "Guard replicas Prometheus scrapes (job stunner-guard). Alert: StunnerGuardDown.",
            query('sum(up{job="stunner-guard"})', instant=True),
        ).thresholds(steps((None, "red"), (1, "orange"), (2, "green")))
    )
    d = d.with_panel(
        number(
            "Replicas ready",
            "Replicas whose /readyz answers ready. Alert: StunnerGuardNoReadyReplica.",
            query("sum(stunner_guard_ready)", instant=True),
        ).thresholds(steps((None, "red"), (1, "orange"), (2, "green")))
    )
    d = d.with_panel(
        number(
            "Pod watch",
            "The drain's pod watch on every replica that has started it (absent until the "
            "first drain call). Alert: StunnerGuardPodWatchDisconnected.",
            query("min(stunner_guard_pod_watch_connected)", instant=True),
        )
        .mappings(states(("1", "connected", "green"), ("0", "disconnected", "red")))
        .no_value("not started")
    )
    d = d.with_panel(
        number(
            "Certificate days left",
            "Days until notAfter of the serving certificate and of its CA, on the replica "
            "that sees the earliest. Alerts: StunnerGuardCertificateExpiringSoon (30 days), "
            "StunnerGuardCertificateExpiring (7 days).",
            query(
                "min by (certificate) "
                "((stunner_guard_certificate_expiry_timestamp_seconds - time()) / 86400)",
                "{{certificate}}",
                instant=True,
            ),
        )
        .span(8)
        .decimals(1)
        .thresholds(steps((None, "red"), (7, "orange"), (30, "green")))
    )
    d = d.with_panel(
        number(
            "Certificate files readable",
            "0: the guard cannot read or parse the file, and its expiry is unknown. "
            "Alert: StunnerGuardCertificateUnreadable.",
            query(
                "min by (certificate) (stunner_guard_certificate_readable)",
                "{{certificate}}",
                instant=True,
            ),
        ).mappings(states(("1", "readable", "green"), ("0", "UNREADABLE", "red")))
    )

    d = d.with_row(dashboard.Row("Admission"))
    d = d.with_panel(
        graph(
            "Reviews by webhook, kind and verdict",
            "AdmissionReviews the guard decided, per second.",
            "reqps",
            query(
                "sum by (webhook, kind, verdict) "
                "(rate(stunner_guard_admission_requests_total[$__rate_interval]))",
                "{{webhook}} {{kind}} {{verdict}}",
            ),
        )
    )
    d = d.with_panel(
        graph(
            "Denials by webhook, kind and operation",
            "Reviews the guard denied (HTTP 200, allowed: false), per second.",
            "reqps",
            query(
                "sum by (webhook, kind, operation) (rate("
                'stunner_guard_admission_requests_total{verdict="denied"}[$__rate_interval]))',
                "{{webhook}} {{kind}} {{operation}}",
            ),
        )
    )
    d = d.with_panel(
        graph(
            "Decision latency (guard)",
            "Time from request to answer inside the guard. Alert: StunnerGuardAdmissionSlow.",
            "s",
            *(
                query(
                    f"histogram_quantile({q}, sum by (le, webhook) "
                    "(rate(stunner_guard_admission_duration_seconds_bucket[$__rate_interval])))",
                    f"p{round(q * 100)} {{{{webhook}}}}",
                )
                for q in (0.5, 0.9, 0.99)
            ),
        )
    )
    d = d.with_panel(
        graph(
            "Call latency at the apiserver",
            "The apiserver's view: the guard's decision plus network and TLS (kube-apiserver "
            "metrics). Alert: StunnerGuardAdmissionSlowAtAPIServer.",
            "s",
            *(
                query(
                    f"histogram_quantile({q}, sum by (le, name) "
                    "(rate(apiserver_admission_webhook_admission_duration_seconds_bucket"
                    f"{{{GUARD_WEBHOOKS}}}[$__rate_interval])))",
                    f"p{round(q * 100)} {{{{name}}}}",
                )
                for q in (0.5, 0.99)
            ),
        )
    )
    d = d.with_panel(
        graph(
            "Failed calls and refused bodies",
            "Calls that failed at the apiserver (fail open: admitted unchecked; fail closed: "
            "refused), bodies the guard refused (400/413), and decisions taken without the "
            "Kubernetes API. Alerts: StunnerGuardAdmissionFailingOpen, "
            "StunnerGuardAdmissionFailingClosed, StunnerGuardAdmissionBadRequests.",
            "reqps",
            query(
                "sum by (name) (rate(apiserver_admission_webhook_fail_open_count"
                f"{{{GUARD_WEBHOOKS}}}[$__rate_interval]))",
                "fail open {{name}}",
            ),
            query(
                "sum by (name, error_type) (rate(apiserver_admission_webhook_rejection_count"
                f'{{{GUARD_WEBHOOKS}, error_type!="no_error"}}[$__rate_interval]))',
                "fail closed {{name}} {{error_type}}",
            ),
            query(
                "sum by (webhook, status) "
                "(rate(stunner_guard_admission_bad_requests_total[$__rate_interval]))",
                "refused {{webhook}} HTTP {{status}}",
            ),
            query(
                "sum(rate(stunner_guard_kube_unreachable_total[$__rate_interval]))",
                "decided without the API",
            ),
        )
    )
    d = d.with_panel(
        graph(
            "Calls by answer at the apiserver",
            "Every call the apiserver made to the guard's webhooks, by HTTP code and whether "
            "the object was refused (kube-apiserver metrics).",
            "reqps",
            query(
                "sum by (name, code, rejected) (rate(apiserver_admission_webhook_request_total"
                f"{{{GUARD_WEBHOOKS}}}[$__rate_interval]))",
                "{{name}} {{code}} rejected={{rejected}}",
            ),
        )
    )

    d = d.with_row(dashboard.Row("Drain"))
    d = d.with_panel(
        graph(
            "Drains in progress",
            "Pods whose preStop hook the guard holds, drain calls held (a repeated delivery "
            "counts again) and the capacity (drain.maxConcurrent, summed over replicas). "
            "Alert: StunnerGuardDrainCapacityNearlyFull.",
            "short",
            query("sum(stunner_guard_drains_in_progress)", "pods held"),
            query("sum(stunner_guard_drain_calls_held)", "calls held"),
            query("sum(stunner_guard_drain_capacity)", "capacity"),
        )
    )
    d = d.with_panel(
        graph(
            "Drain answers by outcome (per minute)",
            "drained and pod_deleted end well; deadline cut calls; unobservable released a "
            "pod blind; over_capacity was not held. Alerts: StunnerGuardDrainDeadline, "
            "StunnerGuardDrainUnobservable, StunnerGuardDrainOverCapacity.",
            "short",
            query(
                "60 * sum by (outcome) "
                "(rate(stunner_guard_drain_outcomes_total[$__rate_interval]))",
                "{{outcome}}",
            ),
        )
    )
    d = d.with_panel(
        bargauge.Panel()
        .title("Drain answers in the time range")
        .description("Drain endpoint answers by outcome over the dashboard's time range.")
        .datasource(DATASOURCE)
        .unit("short")
        .span(8)
        .height(8)
        .with_target(
            query(
                "sum by (outcome) (increase(stunner_guard_drain_outcomes_total[$__range]))",
                "{{outcome}}",
                instant=True,
            ).ref_id("A")
        )
    )
    d = d.with_panel(
        number(
            "Allocations left at the deadline",
            "TURN allocations on pods whose drain ended at the deadline, summed over the "
            "time range: calls that were still up when stunnerd got SIGTERM.",
            query(
                "sum(increase(stunner_guard_drain_allocations_left_sum[$__range]))",
                instant=True,
            ),
        )
        .height(8)
        .thresholds(steps((None, "green"), (1, "orange")))
    )
    d = d.with_panel(
        graph(
            "Allocations left at the deadline",
            f"Median and p99 of the allocations a pod still had at its drain deadline, "
            f"over {DRAIN_WINDOW}.",
            "short",
            *(
                query(
                    f"histogram_quantile({q}, sum by (le) "
                    f"(rate(stunner_guard_drain_allocations_left_bucket[{DRAIN_WINDOW}])))",
                    f"p{round(q * 100)}",
                )
                for q in (0.5, 0.99)
            ),
        ).span(12)
    )
    d = d.with_panel(
        graph(
            "Drain duration by outcome",
            f"Median and p99 of how long drains held the preStop hook, over {DRAIN_WINDOW}.",
            "s",
            *(
                query(
                    f"histogram_quantile({q}, sum by (le, outcome) "
                    f"(rate(stunner_guard_drain_duration_seconds_bucket[{DRAIN_WINDOW}])))",
                    f"p{round(q * 100)} {{{{outcome}}}}",
                )
                for q in (0.5, 0.99)
            ),
        )
    )
    d = d.with_panel(
        graph(
            "Allocation reads by result",
            "Reads of stunner_allocations_active from draining stunnerd pods, per second, "
            "by result; failed reads end a drain as unobservable after drain.maxFailedReads.",
            "reqps",
            query(
                "sum by (result) (rate(stunner_guard_drain_scrapes_total[$__rate_interval]))",
                "{{result}}",
            ),
        )
    )

    d = d.with_row(dashboard.Row("Census"))
    d = d.with_panel(
        number(
            "Census mode",
            "Replicas per census.mode: enforce writes pod-deletion-cost (one replica, the "
            "Lease holder); warn computes and shows the costs on every replica and writes "
            "nothing; off runs no census. Two modes at once: a rollout in progress.",
            query("count by (mode) (stunner_guard_census_mode == 1)", "{{mode}}", instant=True),
        ).height(8)
    )
    d = d.with_panel(
        number(
            "Census leaders",
            "Replicas holding the census Lease. Enforce mode: exactly 1. 0 in enforce mode: "
            "nobody writes the costs (alert StunnerGuardCensusNoLeader); 2 or more: each "
            "writes (StunnerGuardCensusSplitBrain). 0 is right in warn and off mode.",
            query("sum(stunner_guard_census_leader)", instant=True),
        )
        .height(8)
        .thresholds(steps((None, "red"), (1, "green"), (2, "red")))
    )
    d = d.with_panel(
        number(
            "Pods in the census",
            "Running, non-terminating stunnerd pods in the last census round: the leader's "
            "in enforce mode (followers read nothing and show 0), every replica's in warn "
            "mode; the most any replica shows.",
            query("max(stunner_guard_census_pods)", instant=True),
        ).height(8)
    )
    d = d.with_panel(
        bargauge.Panel()
        .title("Pods by cost level")
        .description(
            "Pods by the pod-deletion-cost the census wants for them, from the last round: 0 "
            "empty, 1 one allocation, 2 for 2-3, 3 for 4-7, n for 2^(n-1) to 2^n - 1. A "
            "scale-down removes the lowest cost first. Pods whose allocations could not be "
            "read are not counted."
        )
        .datasource(DATASOURCE)
        .unit("short")
        .span(12)
        .height(8)
        .orientation(common.VizOrientation.VERTICAL)
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .with_target(
            # A range query comes back ordered by its labels; the level padded to two
            # digits orders it 00, 01, ... 31 rather than 0, 1, 10, 11, ... 2.
            query(
                'label_replace(max by (cost) (stunner_guard_census_pods_by_cost), "cost", '
                '"0$1", "cost", "([0-9])")',
                "{{cost}}",
            ).ref_id("A")
        )
    )
    d = d.with_panel(
        graph(
            "Census leader by replica",
            "1 on the replica holding the census Lease. A handover (rollout, SIGTERM) shows "
            "as one line falling and another rising within census.retryPeriodSeconds; a "
            "leader cut off from the API stops at census.renewDeadlineSeconds and another "
            "takes over after census.leaseDurationSeconds.",
            "short",
            query("max by (instance, pod) (stunner_guard_census_leader)", "{{instance}} {{pod}}"),
        ).line_interpolation(common.LineInterpolation.STEP_AFTER)
    )
    d = d.with_panel(
        graph(
            "Census round duration",
            f"Median and p99 of a round (reading every pod, then writing), over "
            f"{CENSUS_WINDOW}. A round longer than census.intervalSeconds delays the next: "
            "look at slow reads (drain.scrapeTimeoutSeconds) and slow API writes.",
            "s",
            *(
                query(
                    f"histogram_quantile({q}, sum by (le) "
                    f"(rate(stunner_guard_census_round_duration_seconds_bucket[{CENSUS_WINDOW}])))",
                    f"p{round(q * 100)}",
                )
                for q in (0.5, 0.99)
            ),
        )
    )
    d = d.with_panel(
        graph(
            "Census reads by result (per minute)",
            "Reads of stunner_allocations_active by the census. failed: no good answer in "
            "time; unobservable: the metrics endpoint is off or refuses (Dataplane "
            "spec.enableMetricsEndpoint). Either way the pod keeps the cost it has. Alert: "
            "StunnerGuardCensusReadsFailing.",
            "short",
            query(
                "60 * sum by (result) (rate(stunner_guard_census_reads_total[$__rate_interval]))",
                "{{result}}",
            ),
        )
    )
    d = d.with_panel(
        graph(
            "Cost writes and writes held back (per minute)",
            "pod-deletion-cost writes by result: ok; conflict, the pod changed since the "
            "watch saw it (tried again next round); failed, the API refused or did not "
            "answer (alert StunnerGuardCensusWritesFailing). Writes held back by reason: "
            "budget (census.maxWritesPerSecond after census.writeBurst: a steady line means "
            "costs lag, most urgent first), min_interval (the pod was written less than "
            "census.minPatchSeconds ago, or a new leader waits), warn (warn mode writes "
            "nothing).",
            "short",
            query(
                "60 * sum by (result) (rate(stunner_guard_census_writes_total[$__rate_interval]))",
                "written {{result}}",
            ),
            query(
                "60 * sum by (reason) "
                "(rate(stunner_guard_census_writes_skipped_total[$__rate_interval]))",
                "held back: {{reason}}",
            ),
        )
    )
    return d


def render() -> str:
    """The dashboard JSON exactly as committed."""
    model = build().build()
    # Panel ids in layout order: Grafana keys panel links and repeats on them.
    for number_, panel in enumerate(model.panels, start=1):
        panel.id_val = number_
    return json.dumps(json.loads(JSONEncoder().encode(model)), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m observability.dashboard", description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed file differs")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if OUTPUT.read_text() != text:
            print(f"{OUTPUT} is out of date: run make dashboard", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
