"""balancerd.metrics and balancerd.nvml against the real OpenTelemetry SDK, exporters and promtool."""

from __future__ import annotations

import gzip
import http.server
import io
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from balancerd.config import MetricsConfig, parse_config
from balancerd.daemon import Daemon
from balancerd.log import Log
from balancerd.metrics import (
    BY_NAME,
    COUNTER,
    GAUGE,
    METRICS,
    OPT_IN_SERIES_LIMIT,
    REJECT_REASONS,
    SDK_SERIES_LIMIT,
    Metrics,
    series_plan,
)
from balancerd.nvml import Gpus
from tests.telemetry_writer import TelemetryProcess, WriterSpec

DEEPSEEK_V3 = {"world": 8, "layers": 58, "experts": 256}
WAIT_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def promtool_check(text: str) -> None:
    """`promtool check metrics` must accept the scrape (skipped without promtool, outside CI)."""
    if shutil.which("promtool") is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing in CI (.ci/run installs Debian's prometheus package)")
        pytest.skip("promtool not installed (apt install prometheus); CI runs this check")
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a scrape: (name, labels) -> value."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def series_by_family(text: str) -> dict[str, int]:
    """Distinct label sets per metric family (a histogram's le not counted)."""
    out = {}
    for fam in text_string_to_metric_families(text):
        labels = {tuple(sorted((k, v) for k, v in s.labels.items() if k != "le")) for s in fam.samples}
        out[fam.name] = len(labels)
    return out


def test_default_deepseek_v3_series_stay_under_the_sdk_cap():
    plan = series_plan(**DEEPSEEK_V3, cfg=MetricsConfig(), gpus=8)
    assert max(plan.values()) < SDK_SERIES_LIMIT
    assert plan["balancerd.layer.imbalance"] == 58
    assert plan["balancerd.rank.load.share"] == 8
    assert plan["balancerd.gpu.nvlink.transferred"] == 16
    assert plan["balancerd.plans.rejected"] == len(REJECT_REASONS)
    assert all(plan[d.name] == 0 for d in METRICS if d.opt_in in ("expert_top_n", "expert_layers"))
    # With the layer, a latency histogram's Prometheus series (8 x 58 x buckets) would pass the cap.
    dispatch = BY_NAME["balancerd.rank.dispatch.duration"]
    assert plan[dispatch.name] == 8
    assert plan[dispatch.name] * dispatch.series_per_point < SDK_SERIES_LIMIT
    prometheus_series = sum(plan[d.name] * d.series_per_point for d in METRICS)
    assert prometheus_series < 1000, prometheus_series


def test_latency_histograms_keep_the_layer_only_where_it_fits():
    d = BY_NAME["balancerd.rank.combine.duration"]
    assert "layer" in d.attributes_for(4, 4)          # the CPU demo: 4 x 4 x 15 series
    assert "layer" not in d.attributes_for(8, 58)     # DeepSeek-V3 on 8 GPUs
    assert d.attributes_for(8, 58) == ("moe_job", "rank")


def test_per_expert_series_are_explicit_configuration():
    top = series_plan(**DEEPSEEK_V3, cfg=MetricsConfig(expert_top_n=8), gpus=8)
    assert top["balancerd.expert.hot.id"] == top["balancerd.expert.hot.load.share"] == 58 * 8
    every = series_plan(**DEEPSEEK_V3, cfg=MetricsConfig(expert_layers=tuple(range(60))), gpus=8)
    assert every["balancerd.expert.load.share"] == 58 * 256  # layers past the model's are ignored
    assert SDK_SERIES_LIMIT < every["balancerd.expert.load.share"] <= OPT_IN_SERIES_LIMIT


def test_every_definition_gets_the_prometheus_name_the_exporter_gives_it():
    """The names the dashboard generator derives from METRICS are the real exporter's."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.metrics import Observation
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    reader = PrometheusMetricReader(registry=registry, scope_info_enabled=False)
    provider = MeterProvider(metric_readers=[reader])
    meter = provider.get_meter("test")
    for d in METRICS:
        attrs = {a: "1" for a in d.attributes}
        if d.kind == GAUGE:
            meter.create_observable_gauge(d.name, [lambda _o, a=attrs: [Observation(0.5, a)]], d.unit,
                                          d.description)
        elif d.kind == COUNTER:
            meter.create_counter(d.name, d.unit, d.description).add(2, attrs)
        else:
            meter.create_histogram(d.name, d.unit, d.description,
                                   explicit_bucket_boundaries_advisory=d.buckets).record(0.01, attrs)
    text = generate_latest(registry).decode()
    provider.shutdown()
    names = {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}
    for d in METRICS:
        assert d.prometheus.startswith("balancerd_")
        assert set(d.samples) <= names, (d.name, d.samples)
    promtool_check(text)


@pytest.mark.slow
def test_deepseek_v3_scrape_holds_the_planned_series_and_passes_promtool(tmp_path):
    """A real writer of DeepSeek-V3's shape (8 ranks, 58 layers, 256 experts), the daemon stepped here,
    its Prometheus endpoint scraped: every metric holds exactly the series the plan counts."""
    (tmp_path / "run").mkdir()
    port = free_port()
    cfg = parse_config({
        "runtime_dir": str(tmp_path / "run"), "state_dir": str(tmp_path / "state"),
        "detect": {"min_tokens": 1000, "cooldown_s": 0.0, "sustain": 2}, "window": {"intervals": 4},
        "policy": {"expert_bytes": 1024, "ack_timeout_s": 10.0},
        # 9 x 256 = 2,304 per-expert series: past the SDK's default cap, which configuring them raises
        "metrics": {"prometheus_address": f"127.0.0.1:{port}", "expert_top_n": 4,
                    "expert_layers": list(range(9))},
    })
    log = io.StringIO()
    daemon = Daemon(cfg, Log("debug", log, journal=False), serve_api=False)
    daemon.metrics = Metrics.start(cfg.metrics, daemon.log, daemon.saved)
    spec = WriterSpec(layers=58, experts=256, world=8, slots_per_rank=36, tokens=1024, top_k=8,
                      interval_s=0.1, load={"kind": "zipf", "s": 1.2})
    try:
        with TelemetryProcess(tmp_path / "run", spec):
            deadline = time.monotonic() + WAIT_S
            while (((daemon.snapshot(time.time())["jobs"].get("fake") or {}).get("last_plan") or {})
                   .get("state") != "applied"):
                assert time.monotonic() < deadline, log.getvalue()[-3000:]
                daemon.step(time.time())
                time.sleep(0.05)
            text = scrape(port)
    finally:
        daemon.close()
    got = series_by_family(text)
    plan = series_plan(**DEEPSEEK_V3, cfg=cfg.metrics, gpus=0)
    assert plan["balancerd.expert.load.share"] > SDK_SERIES_LIMIT
    for d in METRICS:
        assert got.get(d.prometheus, 0) == plan[d.name], d.name
    assert "overflow" not in text
    assert 'balancerd_plans_applied_total{moe_job="fake"} 1.0' in text
    assert "NVML" in log.getvalue() and " error " not in log.getvalue()
    promtool_check(text)


def test_without_nvml_gpu_metrics_are_absent_after_one_log_line():
    out = io.StringIO()
    gpus = Gpus.open(Log("debug", out, journal=False))
    if gpus is not None:  # a GPU node: the real readings instead
        samples = gpus.sample()
        gpus.close()
        assert samples and all(s.memory_total_bytes > 0 for s in samples)
        return
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and "NVML not available; GPU metrics are off" in lines[0]


class _FakeNvml(types.ModuleType):
    """pynvml's calls balancerd.nvml makes, answering like two GPUs where the second reports no power."""

    NVML_SUCCESS, NVML_ERROR_NOT_SUPPORTED = 0, 3
    NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX = 138, 139

    class NVMLError(Exception):
        pass

    def __init__(self):
        super().__init__("pynvml")
        self.shutdowns = 0

    def nvmlInit(self): pass                                   # noqa: E704
    def nvmlShutdown(self): self.shutdowns += 1                # noqa: E704
    def nvmlDeviceGetCount(self): return 2                     # noqa: E704
    def nvmlDeviceGetHandleByIndex(self, i): return i          # noqa: E704

    def nvmlDeviceGetUtilizationRates(self, h):
        return types.SimpleNamespace(gpu=40 + 10 * h, memory=5)

    def nvmlDeviceGetMemoryInfo(self, h):
        return types.SimpleNamespace(used=(h + 1) * 2**30, total=141 * 2**30, free=0)

    def nvmlDeviceGetPowerUsage(self, h):
        if h == 1:
            raise self.NVMLError("not supported")
        return 512_500  # milliwatts

    def nvmlDeviceGetFieldValues(self, h, fields):
        assert [f for f, _ in fields] == [138, 139] and all(scope == 0xFFFFFFFF for _, scope in fields)
        return [types.SimpleNamespace(nvmlReturn=0, value=types.SimpleNamespace(ullVal=1000 * (h + 1))),
                types.SimpleNamespace(nvmlReturn=3, value=types.SimpleNamespace(ullVal=0))]


def test_nvml_readings_convert_to_base_units_and_export(monkeypatch, tmp_path):
    fake = _FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    port = free_port()
    metrics = Metrics.start(MetricsConfig(prometheus_address=f"127.0.0.1:{port}"),
                            Log("debug", io.StringIO(), journal=False), {})
    try:
        text = scrape(port)
    finally:
        metrics.close()
    assert fake.shutdowns == 1
    got = {(name, tuple(sorted(labels))): v for (name, labels), v in samples(text).items()
           if name.startswith("balancerd_gpu_")}
    assert got == {
        ("balancerd_gpu_utilization", (("gpu", "0"),)): 0.4,
        ("balancerd_gpu_utilization", (("gpu", "1"),)): 0.5,
        ("balancerd_gpu_memory_used_bytes", (("gpu", "0"),)): 2**30,
        ("balancerd_gpu_memory_used_bytes", (("gpu", "1"),)): 2 * 2**30,
        ("balancerd_gpu_memory_total_bytes", (("gpu", "0"),)): 141 * 2**30,
        ("balancerd_gpu_memory_total_bytes", (("gpu", "1"),)): 141 * 2**30,
        ("balancerd_gpu_power_watts", (("gpu", "0"),)): 512.5,  # GPU 1 had no answer: no sample
        ("balancerd_gpu_nvlink_transferred_bytes_total", (("direction", "tx"), ("gpu", "0"))): 1000 * 1024,
        ("balancerd_gpu_nvlink_transferred_bytes_total", (("direction", "tx"), ("gpu", "1"))): 2000 * 1024,
    }
    promtool_check(text)


def test_otlp_export_reaches_a_collector(tmp_path):
    """A real OTLP/HTTP exporter posting protobuf to an HTTP receiver; close() flushes."""
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

    received: list[tuple[str, bytes]] = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (the http.server API)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            received.append((self.path, body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    (tmp_path / "run").mkdir()
    cfg = parse_config({"runtime_dir": str(tmp_path / "run"), "state_dir": str(tmp_path / "state"),
                        "metrics": {"prometheus_address": f"127.0.0.1:{free_port()}",
                                    "otlp_endpoint": f"http://127.0.0.1:{server.server_address[1]}"}})
    log = io.StringIO()
    daemon = Daemon(cfg, Log("debug", log, journal=False), serve_api=False)
    daemon.metrics = Metrics.start(cfg.metrics, daemon.log, daemon.saved)
    daemon.step(time.time())
    daemon.close()
    server.shutdown()
    server.server_close()
    assert received and all(path == "/v1/metrics" for path, _ in received)
    request = ExportMetricsServiceRequest.FromString(received[-1][1])
    names = {m.name for rm in request.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
    assert "balancerd.daemon.heartbeat" in names
    attrs = {kv.key: kv.value.string_value for kv in request.resource_metrics[0].resource.attributes}
    assert attrs["service.name"] == "balancerd"


def test_a_busy_port_is_logged_and_the_daemon_keeps_running(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        address = f"127.0.0.1:{busy.getsockname()[1]}"
        out = io.StringIO()
        metrics = Metrics.start(MetricsConfig(prometheus_address=address), Log("debug", out, journal=False),
                                {})
        metrics.close()
    errors = [line for line in out.getvalue().splitlines() if " error " in line]
    assert len(errors) == 1 and "cannot serve metrics" in errors[0] and address in errors[0]


def test_commands_other_than_run_never_import_opentelemetry():
    code = ("import sys, balancerd.cli, balancerd.daemon, balancerd.metrics; "
            "print(sorted(m for m in sys.modules if m.startswith(('opentelemetry', 'prometheus_client', "
            "'pynvml'))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
