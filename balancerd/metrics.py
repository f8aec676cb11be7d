"""Metrics: the one table of definitions, the cardinality plan, and the OpenTelemetry exporter.

:data:`METRICS` is the single source of metric names: :class:`Metrics` creates its instruments from
it and ``dashboards/generate.py`` derives every PromQL name from it (and its ``--check`` refuses a
query naming anything else). The daemon calls :meth:`Metrics.observe` after each loop step; gauges
are published as one frame that the exporters' collections read, counters and histograms are
recorded as the step found them. OpenTelemetry is imported only by :meth:`Metrics.start`, so the
other commands never pay for it. See docs/metrics.md.
"""

from __future__ import annotations

import re
import socket
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from balancerd.config import MetricsConfig
from balancerd.detect import layer_loads
from balancerd.log import Log
from balancerd.placement import Topology
from balancerd.protocol import PlanResult, RejectReason

if TYPE_CHECKING:
    from balancerd.daemon import Daemon
    from balancerd.detect import Detection
    from balancerd.ingest import JobFeed, RankFeed
    from balancerd.jobrun import JobRun
    from balancerd.nvml import Gpus, GpuSample
    from balancerd.state import JobState

GAUGE, COUNTER, HISTOGRAM = "gauge", "counter", "histogram"
SDK_SERIES_LIMIT = 2000        # the OpenTelemetry SDK's default attribute sets per metric
OPT_IN_SERIES_LIMIT = 65536    # the SDK limit of the per-expert metrics once they are configured
GPU_SAMPLE_TTL_S = 1.0         # one NVML sample serves every collection within this time
REJECT_REASONS = tuple(r.name.lower() for r in RejectReason if r is not RejectReason.OK) + ("rolled_back",)
LATENCY_BUCKETS_S = (10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 100e-3,
                     1.0)
MIGRATION_BUCKETS_S = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_PROMETHEUS_UNITS = {"1": "", "s": "seconds", "By": "bytes", "W": "watts"}


@dataclass(frozen=True)
class MetricDef:
    """One metric: its OpenTelemetry name, kind, UCUM unit, description and attribute keys."""

    name: str
    kind: str                             # gauge | counter | histogram
    unit: str
    description: str
    attributes: tuple[str, ...] = ()
    opt_in: str | None = None             # "expert_top_n" | "expert_layers" | "nvml": exported only then
    layer_when_room: bool = False         # carries "layer" only while its series fit SDK_SERIES_LIMIT
    buckets: tuple[float, ...] = ()       # histogram bucket bounds

    @property
    def prometheus(self) -> str:
        """The family name on a Prometheus scrape: the exporter's rule, dots to "_" and a unit suffix."""
        name = re.sub(r"[^a-zA-Z0-9:]+", "_", self.name)
        unit = "" if self.unit.startswith("{") else _PROMETHEUS_UNITS[self.unit]
        return f"{name}_{unit}" if unit and not name.endswith(f"_{unit}") else name

    @property
    def samples(self) -> tuple[str, ...]:
        """The sample names a scrape shows for it."""
        p = self.prometheus
        if self.kind == COUNTER:
            return (f"{p}_total",)
        if self.kind == HISTOGRAM:
            return (f"{p}_bucket", f"{p}_sum", f"{p}_count")
        return (p,)

    @property
    def series_per_point(self) -> int:
        """Prometheus series per attribute set: a histogram's buckets, sum and count."""
        return len(self.buckets) + 2 if self.kind == HISTOGRAM else 1

    def attributes_for(self, world: int, layers: int) -> tuple[str, ...]:
        """The attribute keys it carries for a job of ``world`` ranks and ``layers`` layers: a
        ``layer_when_room`` metric drops the layer unless world x layers x series_per_point, its
        Prometheus series with the layer, stay within SDK_SERIES_LIMIT."""
        if self.layer_when_room and world * layers * self.series_per_point > SDK_SERIES_LIMIT:
            return tuple(a for a in self.attributes if a != "layer")
        return self.attributes


_JOB, _LAYER, _RANK = ("moe_job",), ("moe_job", "layer"), ("moe_job", "rank")

METRICS: tuple[MetricDef, ...] = (
    MetricDef("balancerd.layer.imbalance", GAUGE, "1",
              "GPU max/min load of the layer over the sliding window (1 is perfect; rebalancing pays "
              "above 3).", _LAYER),
    MetricDef("balancerd.layer.balancedness", GAUGE, "1",
              "GPU max/mean load of the layer over the sliding window: how much longer the layer takes "
              "than it would perfectly balanced.", _LAYER),
    MetricDef("balancerd.rank.load.share", GAUGE, "1",
              "Share of the job's (token, expert) assignments that land on the rank's GPU over the window, "
              "under the served placement (1/world is even).", _RANK),
    MetricDef("balancerd.rank.dispatch.duration", HISTOGRAM, "s",
              "Dispatch all-to-all time per step of one MoE layer, one observation per layer per telemetry "
              "record.", (*_RANK, "layer"), layer_when_room=True, buckets=LATENCY_BUCKETS_S),
    MetricDef("balancerd.rank.combine.duration", HISTOGRAM, "s",
              "Combine all-to-all time per step of one MoE layer, one observation per layer per telemetry "
              "record.", (*_RANK, "layer"), layer_when_room=True, buckets=LATENCY_BUCKETS_S),
    MetricDef("balancerd.rank.step.duration", GAUGE, "s", "Mean step time of the rank over the window.",
              _RANK),
    MetricDef("balancerd.rank.alltoall.share", GAUGE, "1",
              "Share of the rank's step time spent in the dispatch and combine all-to-alls over the window.",
              _RANK),
    MetricDef("balancerd.rank.record.age", GAUGE, "s",
              "Seconds since the rank's newest telemetry record was written (since attaching, if none).",
              _RANK),
    MetricDef("balancerd.telemetry.records.read", COUNTER, "{record}",
              "Telemetry records read from the rank's ring and used.", _RANK),
    MetricDef("balancerd.telemetry.records.dropped", COUNTER, "{record}",
              "Telemetry records the rank's ring overwrote before the daemon read them.", _RANK),
    MetricDef("balancerd.telemetry.records.invalid", COUNTER, "{record}",
              "Telemetry records that failed validation (checksum, sequence, job, shape, values).", _RANK),
    MetricDef("balancerd.plans.proposed", COUNTER, "{plan}", "Plans the daemon published to the job.",
              _JOB),
    MetricDef("balancerd.plans.applied", COUNTER, "{plan}", "Published plans every rank applied.", _JOB),
    MetricDef("balancerd.plans.rejected", COUNTER, "{plan}",
              "Published plans a rank rejected or rolled back, by the reason the rank gave.",
              (*_JOB, "reason")),
    MetricDef("balancerd.plans.unacknowledged", COUNTER, "{plan}",
              "Published plans not acknowledged by every rank within policy.ack_timeout_s.", _JOB),
    MetricDef("balancerd.migration.transferred", COUNTER, "By",
              "Expert weight bytes the ranks received while applying placement plans.", _JOB),
    MetricDef("balancerd.migration.duration", HISTOGRAM, "s",
              "Wall time of a placement plan's migration, from agreement to switch (slowest rank).", _JOB,
              buckets=MIGRATION_BUCKETS_S),
    MetricDef("balancerd.plan.predicted_gain", GAUGE, "1",
              "Share of MoE layer time the last applied placement plan was predicted to save "
              "(1 - balancedness after / before, mean over layers).", _JOB),
    MetricDef("balancerd.plan.realised_gain", GAUGE, "1",
              "The same share measured now, with the plan serving: 1 - balancedness now / before.", _JOB),
    MetricDef("balancerd.daemon.heartbeat", GAUGE, "s", "Unix time of the daemon's last loop step."),
    MetricDef("balancerd.expert.load.share", GAUGE, "1",
              "Share of the layer's assignments routed to the expert over the window "
              "(metrics.expert_layers).",
              (*_LAYER, "expert"), opt_in="expert_layers"),
    MetricDef("balancerd.expert.hot.load.share", GAUGE, "1",
              "Share of the layer's assignments routed to its n-th hottest expert (metrics.expert_top_n).",
              (*_LAYER, "position"), opt_in="expert_top_n"),
    MetricDef("balancerd.expert.hot.id", GAUGE, "{expert}",
              "Logical id of the layer's n-th hottest expert over the window (metrics.expert_top_n).",
              (*_LAYER, "position"), opt_in="expert_top_n"),
    MetricDef("balancerd.gpu.utilization", GAUGE, "1",
              "Share of the last sample period a kernel ran on the GPU (NVML).", ("gpu",), opt_in="nvml"),
    MetricDef("balancerd.gpu.memory.used", GAUGE, "By", "GPU memory in use (NVML).", ("gpu",),
              opt_in="nvml"),
    MetricDef("balancerd.gpu.memory.total", GAUGE, "By", "GPU memory installed (NVML).", ("gpu",),
              opt_in="nvml"),
    MetricDef("balancerd.gpu.power", GAUGE, "W", "GPU power draw (NVML).", ("gpu",), opt_in="nvml"),
    MetricDef("balancerd.gpu.nvlink.transferred", COUNTER, "By",
              "NVLink data bytes over all the GPU's links since the driver loaded (NVML; rate() is the "
              "throughput).", ("gpu", "direction"), opt_in="nvml"),
)

BY_NAME: dict[str, MetricDef] = {d.name: d for d in METRICS}


_GPU_FIELDS = {"balancerd.gpu.utilization": "utilization", "balancerd.gpu.memory.used": "memory_used_bytes",
               "balancerd.gpu.memory.total": "memory_total_bytes", "balancerd.gpu.power": "power_watts"}


def _gpu_values(metric: str, g: GpuSample) -> list[tuple[float | None, dict[str, Any]]]:
    """(value, extra attributes) of one NVML metric for one GPU; None where NVML had no answer."""
    if metric == "balancerd.gpu.nvlink.transferred":
        return [(g.nvlink_tx_bytes, {"direction": "tx"}), (g.nvlink_rx_bytes, {"direction": "rx"})]
    return [(getattr(g, _GPU_FIELDS[metric]), {})]


# -- the cardinality plan -------------------------------------------------------------------------------


def enabled(d: MetricDef, cfg: MetricsConfig, gpus: int) -> bool:
    """Whether ``d`` is exported under ``cfg`` on a node with ``gpus`` NVML devices."""
    return {None: True, "expert_top_n": cfg.expert_top_n > 0, "expert_layers": bool(cfg.expert_layers),
            "nvml": gpus > 0}[d.opt_in]


def series_plan(world: int, layers: int, experts: int, cfg: MetricsConfig, gpus: int) -> dict[str, int]:
    """Attribute sets (the SDK's series; a histogram's buckets are not counted) each metric holds for
    one job of this shape: the product of its attributes' domains, 0 for an opt-in left off."""
    domains = {"moe_job": 1, "layer": layers, "rank": world, "expert": experts,
               "position": min(cfg.expert_top_n, experts), "reason": len(REJECT_REASONS),
               "gpu": gpus, "direction": 2}
    chosen_layers = sum(1 for layer in cfg.expert_layers if layer < layers)
    plan = {}
    for d in METRICS:
        n = int(enabled(d, cfg, gpus))
        for attr in d.attributes_for(world, layers):
            n *= chosen_layers if (attr, d.opt_in) == ("layer", "expert_layers") else domains[attr]
        plan[d.name] = n
    return plan


# -- the exporter -----------------------------------------------------------------------------------------


@dataclass
class _RankCursor:
    """What was already recorded from one rank's ring reader."""

    read: int = 0
    dropped: int = 0
    invalid: int = 0
    seq: int | None = None   # of the newest record whose latencies were observed


class Metrics:
    """OpenTelemetry instruments exported on a Prometheus endpoint and, when configured, over OTLP.
    Build with :meth:`start`; call :meth:`observe` after each loop step and :meth:`close` on stop."""

    def __init__(self, cfg: MetricsConfig, log: Log, provider: Any, server: Any, gpus: Gpus | None,
                 saved: Mapping[str, JobState]):
        from opentelemetry.metrics import Observation

        self.cfg, self.log = cfg, log
        self._provider, self._server, self._gpus = provider, server, gpus
        self._observation = Observation
        self._frame: dict[str, list[tuple[float, dict[str, Any]]]] = {}
        self._gpu_sample: tuple[float, list[GpuSample]] = (-GPU_SAMPLE_TTL_S, [])
        self._gpu_lock = threading.Lock()
        self._cursors: weakref.WeakKeyDictionary[RankFeed, _RankCursor] = weakref.WeakKeyDictionary()
        self._plans = {job: {e["version"]: e["state"] for e in s.history} for job, s in saved.items()}
        self._jobs_seen: set[str] = set()
        meter = provider.get_meter("balancerd")
        gpus_n = 0 if gpus is None else gpus.count
        self._sync: dict[str, Any] = {}
        for d in METRICS:
            if not enabled(d, cfg, gpus_n):
                continue
            read = self._gpu_callback(d.name) if d.opt_in == "nvml" else self._frame_callback(d.name)
            if d.kind == GAUGE:
                meter.create_observable_gauge(d.name, [read], d.unit, d.description)
            elif d.kind == COUNTER and d.opt_in == "nvml":
                meter.create_observable_counter(d.name, [read], d.unit, d.description)
            elif d.kind == COUNTER:
                self._sync[d.name] = meter.create_counter(d.name, d.unit, d.description)
            else:
                self._sync[d.name] = meter.create_histogram(d.name, d.unit, d.description,
                                                            explicit_bucket_boundaries_advisory=d.buckets)

    @classmethod
    def start(cls, cfg: MetricsConfig, log: Log, saved: Mapping[str, JobState]) -> Metrics:
        """Serve ``cfg.prometheus_address`` (a failure to bind is logged; the daemon runs on without
        it), export over OTLP when ``cfg.otlp_endpoint`` is set, and sample NVML when it is there."""
        from balancerd.nvml import Gpus

        provider, server = _provider(cfg, log)
        return cls(cfg, log, provider, server, Gpus.open(log), saved)

    def close(self) -> None:
        """Stop serving, flush OTLP, release NVML."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        self._provider.shutdown()
        if self._gpus is not None:
            self._gpus.close()

    # -- collection (exporter threads) ----------------------------------------------------------

    def _frame_callback(self, name: str) -> Callable:
        def read(_options: Any) -> list:
            return [self._observation(v, a) for v, a in self._frame.get(name, ())]

        return read

    def _gpu_callback(self, name: str) -> Callable:
        def read(_options: Any) -> list:
            return [self._observation(v, {"gpu": g.index, **extra})
                    for g in self._sample_gpus() for v, extra in _gpu_values(name, g) if v is not None]

        return read

    def _sample_gpus(self) -> list[GpuSample]:
        with self._gpu_lock:
            taken, sample = self._gpu_sample
            if time.monotonic() - taken >= GPU_SAMPLE_TTL_S:
                sample = self._gpus.sample()
                self._gpu_sample = (time.monotonic(), sample)
            return sample

    # -- recording (daemon thread, its lock held) ------------------------------------------------

    def observe(self, daemon: Daemon, now: float) -> None:
        """Record what the daemon's last step changed and publish a new frame of gauges."""
        frame: dict[str, list[tuple[float, dict[str, Any]]]] = {"balancerd.daemon.heartbeat": [(now, {})]}
        try:
            for job, run in daemon.runs.items():
                feed = daemon.ingest.jobs.get(job)
                if feed is None or feed.shape is None:
                    continue
                saved = daemon.saved.get(job)
                self._observe_job(job, run, feed, saved.history if saved else [], now, frame, daemon.log)
        except Exception as exc:  # metrics must never stop the daemon
            self.log.once(f"metrics:{type(exc).__name__}", "error", "metrics update failed",
                          error=f"{type(exc).__name__}: {exc}")
        self._frame = frame

    def _observe_job(self, job: str, run: JobRun, feed: JobFeed, history: list[dict], now: float,
                     frame: dict, log: Log) -> None:
        base = {"moe_job": job}
        if job not in self._jobs_seen:  # counters start at 0, so a first increase is not lost to rate()
            self._jobs_seen.add(job)
            for name in ("balancerd.plans.proposed", "balancerd.plans.applied",
                         "balancerd.plans.unacknowledged", "balancerd.migration.transferred"):
                self._sync[name].add(0, base)
            for reason in REJECT_REASONS:
                self._sync["balancerd.plans.rejected"].add(0, {**base, "reason": reason})
        for rank, rf in feed.ranks.items():
            self._observe_rank_feed(rf, {**base, "rank": rank}, feed)
        self._observe_plans(job, feed, history, base)
        add = _adder(frame)
        version, served = feed.served_placement(log)
        counts = run.window.sliding.sum()
        if counts.sum() > 0:
            _load_gauges(counts, served, feed, base, add)
            _expert_gauges(counts, self.cfg, base, add)
        _layer_gauges(run.detection, base, add)
        _rank_gauges(feed, now, base, add)
        _gain_gauges(history, version, run.detection, base, add)

    def _observe_rank_feed(self, rf: RankFeed, attrs: dict, feed: JobFeed) -> None:
        """Counter increments since the last step, and the latencies of the rank's newest record
        (when several records arrive in one poll, only the newest is observed)."""
        cur = self._cursors.get(rf)
        if cur is None:  # a new ring reader: its counts start at 0
            cur = self._cursors[rf] = _RankCursor()
            for name in ("read", "dropped", "invalid"):
                self._sync[f"balancerd.telemetry.records.{name}"].add(0, attrs)
        stats = rf.reader.stats
        read, invalid = stats.accepted - rf.rejected, stats.invalid + rf.rejected
        for name, total, done in (("read", read, cur.read), ("dropped", stats.dropped, cur.dropped),
                                  ("invalid", invalid, cur.invalid)):
            if total > done:
                self._sync[f"balancerd.telemetry.records.{name}"].add(total - done, attrs)
        cur.read, cur.dropped, cur.invalid = read, stats.dropped, invalid
        rec = rf.last
        if rec is None or rec.seq == cur.seq:
            return
        cur.seq = rec.seq
        if rf.generation != feed.generation:
            return
        layered = "layer" in BY_NAME["balancerd.rank.dispatch.duration"].attributes_for(rf.world,
                                                                                        rf.shape.layers)
        for name, times in (("balancerd.rank.dispatch.duration", rec.dispatch_us),
                            ("balancerd.rank.combine.duration", rec.combine_us)):
            hist = self._sync[name]
            for layer, us in enumerate(times.tolist()):
                hist.record(us * 1e-6, {**attrs, "layer": layer} if layered else attrs)

    def _observe_plans(self, job: str, feed: JobFeed, history: list[dict], base: dict) -> None:
        """Count every plan state change in the job's history since the last step."""
        seen = self._plans.get(job, {})
        for entry in history:
            version, state = entry["version"], entry["state"]
            if seen.get(version) == state:
                continue
            if version not in seen:
                self._sync["balancerd.plans.proposed"].add(1, base)
            if state == "applied":
                self._sync["balancerd.plans.applied"].add(1, base)
                if entry["policy"] == "placement":
                    self._migration(feed, version, base)
            elif state == "rejected" and entry.get("rejection"):
                r = entry["rejection"]
                reason = r["reason"] if r["result"] == "rejected" else r["result"]
                self._sync["balancerd.plans.rejected"].add(1, {**base, "reason": reason})
            elif state == "unacknowledged":
                self._sync["balancerd.plans.unacknowledged"].add(1, base)
        self._plans[job] = {e["version"]: e["state"] for e in history}

    def _migration(self, feed: JobFeed, version: int, base: dict) -> None:
        done = [s for s in feed.current_statuses().values()
                if s.result is PlanResult.APPLIED and s.result_version == version]
        if done:
            self._sync["balancerd.migration.transferred"].add(sum(s.migration_bytes for s in done), base)
            self._sync["balancerd.migration.duration"].record(max(s.migration_seconds for s in done), base)


# -- gauges (pure: daemon state in, observations out) ----------------------------------------------------

Add = Callable[[str, float, dict], None]


def _adder(frame: dict[str, list]) -> Add:
    def add(name: str, value: float, attrs: dict) -> None:
        frame.setdefault(name, []).append((float(value), attrs))

    return add


def _layer_gauges(d: Detection | None, base: dict, add: Add) -> None:
    if d is not None:
        for layer, (ratio, bal) in enumerate(zip(d.max_min, d.balancedness, strict=True)):
            add("balancerd.layer.imbalance", ratio, {**base, "layer": layer})
            add("balancerd.layer.balancedness", bal, {**base, "layer": layer})


def _load_gauges(counts: np.ndarray, served: np.ndarray, feed: JobFeed, base: dict, add: Add) -> None:
    """Every GPU's share of the window's load under the served placement."""
    per_gpu = layer_loads(counts, served, Topology(gpus=feed.world, slots=feed.slots)).sum(axis=0)
    for rank, share in enumerate(per_gpu / per_gpu.sum()):
        add("balancerd.rank.load.share", share, {**base, "rank": rank})


def _rank_gauges(feed: JobFeed, now: float, base: dict, add: Add) -> None:
    """Record age, step time and all-to-all share of the ranks read here."""
    for rank, rf in feed.current_ranks().items():
        attrs = {**base, "rank": rank}
        add("balancerd.rank.record.age", rf.age(now), attrs)
        if len(rf.times):
            m = rf.mean_times()
            add("balancerd.rank.step.duration", m["step_us"] * 1e-6, attrs)
            if m["step_us"] > 0:
                a2a = float(np.sum(m["dispatch_us"]) + np.sum(m["combine_us"]))
                add("balancerd.rank.alltoall.share", min(1.0, a2a / m["step_us"]), attrs)


def _expert_gauges(counts: np.ndarray, cfg: MetricsConfig, base: dict, add: Add) -> None:
    """The opt-in per-expert series: every expert of the chosen layers, the top N of every layer."""
    layers, experts = counts.shape
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    for layer in cfg.expert_layers:
        if layer < layers:
            for expert, s in enumerate(share[layer].tolist()):
                add("balancerd.expert.load.share", s, {**base, "layer": layer, "expert": expert})
    n = min(cfg.expert_top_n, experts)
    if n:
        top = np.argsort(-share, axis=1, kind="stable")[:, :n]
        for layer in range(layers):
            for position, expert in enumerate(top[layer].tolist()):
                attrs = {**base, "layer": layer, "position": position + 1}
                add("balancerd.expert.hot.load.share", share[layer, expert], attrs)
                add("balancerd.expert.hot.id", expert, attrs)


def _gain_gauges(history: list[dict], served_version: int, d: Detection | None, base: dict, add: Add) -> None:
    """Predicted and realised gain of the newest applied placement plan."""
    applied = [e for e in history if e["state"] == "applied" and "balancedness_before" in e]
    if not applied:
        return
    plan = applied[-1]
    before = plan["balancedness_before"]["mean"]
    add("balancerd.plan.predicted_gain", 1.0 - plan["balancedness_after"]["mean"] / before, base)
    if d is not None and plan["version"] == served_version:
        add("balancerd.plan.realised_gain", 1.0 - float(np.mean(d.balancedness)) / before, base)


def _provider(cfg: MetricsConfig, log: Log) -> tuple[Any, Any]:
    """The MeterProvider with its readers, and the Prometheus HTTP server (None when it could not bind)."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.view import View
    from opentelemetry.sdk.resources import Resource
    from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server

    readers, server = [], None
    host, port = cfg.prometheus_address.rsplit(":", 1)
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    prometheus = PrometheusMetricReader(registry=registry, scope_info_enabled=False)
    try:
        server, _ = start_http_server(int(port), addr=host.strip("[]"), registry=registry)
        readers.append(prometheus)
        log.info("serving metrics", address=cfg.prometheus_address)
    except OSError as exc:
        prometheus.shutdown()
        log.error("cannot serve metrics; running without the Prometheus endpoint",
                  address=cfg.prometheus_address, reason=exc.strerror or exc)
    if cfg.otlp_endpoint is not None:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        endpoint = cfg.otlp_endpoint
        if re.fullmatch(r"https?://[^/]+/?", endpoint):
            endpoint = endpoint.rstrip("/") + "/v1/metrics"
        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=endpoint, timeout=5)))
        log.info("exporting metrics over OTLP", endpoint=endpoint)
    views = [View(instrument_name=d.name, aggregation_cardinality_limit=OPT_IN_SERIES_LIMIT)
             for d in METRICS if d.opt_in in ("expert_top_n", "expert_layers") and enabled(d, cfg, 0)]
    resource = Resource.create({"service.name": "balancerd", "host.name": socket.gethostname()})
    return MeterProvider(metric_readers=readers, resource=resource, views=views), server
