"""balancerd.config: parsing, validation, error messages, the example file, check-config."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest

from balancerd import planner
from balancerd.cli import main
from balancerd.config import (
    ConfigError,
    DaemonConfig,
    DetectConfig,
    PlannerConfig,
    load_config,
    parse_config,
    resolve_runtime_dir,
    resolve_socket,
    resolve_state_dir,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "systemd" / "balancerd.toml"
DOCS = ROOT / "docs" / "configuration.md"


def all_keys() -> list[str]:
    keys = []
    for f in dataclasses.fields(DaemonConfig):
        if dataclasses.is_dataclass(f.default_factory):
            keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(f.default_factory)]
        else:
            keys.append(f.name)
    return keys


def error(data: dict) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value


def test_empty_config_is_the_defaults():
    cfg = parse_config({})
    assert cfg == DaemonConfig()
    assert cfg.detect.threshold == 3.0 and cfg.detect.clear_threshold == 2.5
    assert cfg.policy.expert_bytes == 3 * 7168 * 2048 * 2
    assert cfg.metrics.prometheus_address == "127.0.0.1:9464"


def test_example_file_equals_defaults():
    assert load_config(EXAMPLE) == DaemonConfig()


@pytest.mark.parametrize("key", all_keys())
def test_example_file_and_docs_explain_every_key(key):
    section, _, name = key.rpartition(".")
    text = EXAMPLE.read_text()
    body = text if not section else text.split(f"[{section}]", 1)[1].split("\n[", 1)[0]
    assert re.search(rf"^(# )?{name} = ", body, re.M), f"{key} missing from {EXAMPLE.name}"
    assert f"`{key}`" in DOCS.read_text(), f"{key} missing from {DOCS.name}"


def test_values_are_parsed_and_widened():
    cfg = parse_config({
        "poll_interval_s": 1, "job": "ds-v3", "log_level": "debug",
        "detect": {"threshold": 4, "sustain": 5},
        "planner": {"max_moves_per_layer": 16},
        "policy": {"kind": "token", "mode": "paused"},
        "metrics": {"expert_layers": [0, 3], "otlp_endpoint": "https://collector:4318"},
    })
    assert cfg.poll_interval_s == 1.0 and isinstance(cfg.poll_interval_s, float)
    assert cfg.detect.threshold == 4.0 and isinstance(cfg.detect.threshold, float)
    assert cfg.detect.sustain == 5
    assert cfg.planner.max_moves_per_layer == 16
    assert cfg.metrics.expert_layers == (0, 3)
    assert (cfg.policy.kind, cfg.policy.mode, cfg.job) == ("token", "paused", "ds-v3")


def test_planner_defaults_match_the_planner():
    assert PlannerConfig().tolerance == planner.DEFAULT_TOLERANCE


def test_zero_max_moves_means_unlimited():
    assert parse_config({"planner": {"max_moves_per_layer": 0}}).planner.max_moves_per_layer is None
    assert PlannerConfig(max_moves_per_layer=0) == PlannerConfig()


@pytest.mark.parametrize("data, key, suggestion", [
    ({"detect": {"treshold": 3.0}}, "detect.treshold", "detect.threshold"),
    ({"threshold": 3.0}, "threshold", "detect.threshold"),
    ({"detct": {}}, "detct", "detect"),
    ({"policy": {"kind": "drop", "capacity": 1.5}}, "policy.capacity", "policy.capacity_factor"),
    ({"pol_interval_s": 1.0}, "pol_interval_s", "poll_interval_s"),
])
def test_unknown_key_suggests_the_nearest(data, key, suggestion):
    exc = error(data)
    assert exc.key == key
    assert str(exc) == f"{key}: unknown key; did you mean {suggestion}?"


def test_unknown_key_with_nothing_near():
    assert str(error({"zzzzzz": 1})) == "zzzzzz: unknown key"


@pytest.mark.parametrize("data, key, reason", [
    ({"detect": {"threshold": "3"}}, "detect.threshold", "must be a number"),
    ({"detect": {"threshold": float("nan")}}, "detect.threshold", "finite"),
    ({"detect": {"cooldown_s": float("inf")}}, "detect.cooldown_s", "finite"),
    ({"detect": {"sustain": 2.0}}, "detect.sustain", "must be an integer"),
    ({"detect": {"sustain": True}}, "detect.sustain", "must be an integer"),
    ({"detect": {"sustain": 0}}, "detect.sustain", ">= 1"),
    ({"detect": {"threshold": 1.0}}, "detect.threshold", "> 1.0"),
    ({"detect": {"clear_threshold": 3.5}}, "detect.clear_threshold", "[1.0, threshold=3.0]"),
    ({"detect": {"clear_threshold": 0.5}}, "detect.clear_threshold", "[1.0, threshold=3.0]"),
    ({"detect": {"min_tokens": -1}}, "detect.min_tokens", ">= 0"),
    ({"detect": {"straggler_threshold": 1.0}}, "detect.straggler_threshold", "> 1.0"),
    ({"detect": 3}, "detect", "must be a table"),
    ({"window": {"intervals": 0}}, "window.intervals", ">= 1"),
    ({"window": {"decay_half_life_s": 0.0}}, "window.decay_half_life_s", "> 0"),
    ({"planner": {"tolerance": -0.1}}, "planner.tolerance", ">= 0"),
    ({"planner": {"max_moves_per_layer": -2}}, "planner.max_moves_per_layer", ">= 0"),
    ({"planner": {"nodes": 0}}, "planner.nodes", ">= 1"),
    ({"planner": {"expert_groups": 0}}, "planner.expert_groups", ">= 1"),
    ({"policy": {"kind": "replicate"}}, "policy.kind", "placement, token, drop"),
    ({"policy": {"mode": "manual"}}, "policy.mode", "automatic, paused"),
    ({"policy": {"max_reroute_fraction": 0.0}}, "policy.max_reroute_fraction", "(0, 1)"),
    ({"policy": {"capacity_factor": 1.0}}, "policy.capacity_factor", "> 1.0"),
    ({"policy": {"expert_bytes": 0}}, "policy.expert_bytes", ">= 1"),
    ({"policy": {"migration_bandwidth_gbps": -1.0}}, "policy.migration_bandwidth_gbps", "> 0"),
    ({"policy": {"ack_timeout_s": 0}}, "policy.ack_timeout_s", "> 0"),
    ({"policy": {"bias_limit": 0.0}}, "policy.bias_limit", "> 0"),
    ({"api": {"socket": "relative.sock"}}, "api.socket", "absolute path"),
    ({"api": {"group": ""}}, "api.group", "must not be empty"),
    ({"metrics": {"prometheus_address": "9464"}}, "metrics.prometheus_address", "host:port"),
    ({"metrics": {"prometheus_address": "127.0.0.1:70000"}}, "metrics.prometheus_address", "65535"),
    ({"metrics": {"otlp_endpoint": "collector:4318"}}, "metrics.otlp_endpoint", "http://"),
    ({"metrics": {"expert_top_n": -1}}, "metrics.expert_top_n", ">= 0"),
    ({"metrics": {"expert_layers": [1, "x"]}}, "metrics.expert_layers[1]", "must be an integer"),
    ({"metrics": {"expert_layers": [1, 1]}}, "metrics.expert_layers", "repeat"),
    ({"metrics": {"expert_layers": 3}}, "metrics.expert_layers", "must be a list"),
    ({"runtime_dir": "run/balancerd"}, "runtime_dir", "absolute path"),
    ({"state_dir": ""}, "state_dir", "absolute path"),
    ({"poll_interval_s": 0}, "poll_interval_s", "(0, 60]"),
    ({"log_level": "verbose"}, "log_level", "error, warning, info, debug"),
    ({"job": "a/b"}, "job", "letters, digits"),
])
def test_bad_values_name_the_key_and_reason(data, key, reason):
    exc = error(data)
    assert exc.key == key
    assert str(exc).startswith(f"{key}: ")
    assert reason in exc.reason


def test_python_construction_is_validated_too():
    with pytest.raises(ConfigError, match=r"^detect\.sustain: must be an integer"):
        DetectConfig(sustain="3")
    with pytest.raises(ConfigError, match=r"^detect: must be a \[detect\] table"):
        DaemonConfig(detect={"threshold": 3.0})


def test_ipv6_and_wildcard_addresses_are_allowed_when_configured():
    assert parse_config({"metrics": {"prometheus_address": "[::1]:9464"}}).metrics.prometheus_address
    assert parse_config({"metrics": {"prometheus_address": "0.0.0.0:9464"}}).metrics.prometheus_address


def test_load_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text('[detect]\nthreshold = 3.0\nsustain = = 2\n')
    with pytest.raises(ConfigError, match=r"not valid TOML: .*line 3") as info:
        load_config(bad)
    assert info.value.key == ""


def test_resolve_state_dir_falls_back_when_not_writable(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    cfg = parse_config({"state_dir": str(tmp_path / "file" / "state")})
    assert resolve_state_dir(cfg) == tmp_path / "xdg" / "balancerd"
    assert (tmp_path / "xdg" / "balancerd").is_dir()
    ok = parse_config({"state_dir": str(tmp_path / "state")})
    assert resolve_state_dir(ok) == tmp_path / "state"


def test_resolve_runtime_dir_and_socket(tmp_path, monkeypatch):
    cfg = parse_config({"runtime_dir": str(tmp_path / "run")})
    assert resolve_runtime_dir(cfg) == tmp_path / "run" and (tmp_path / "run").is_dir()
    assert resolve_socket(cfg) == tmp_path / "run" / "balancerd.sock"
    explicit = parse_config({"api": {"socket": str(tmp_path / "api.sock")}})
    assert resolve_socket(explicit) == tmp_path / "api.sock"
    monkeypatch.setenv("BALANCERD_RUNTIME_DIR", str(tmp_path / "env"))
    assert resolve_runtime_dir(DaemonConfig()) == tmp_path / "env"


def test_check_config_ok(capsys):
    assert main(["check-config", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert "ok: policy placement (automatic)" in out and "max/min > 3" in out


@pytest.mark.parametrize("text, message", [
    ("[detect]\nthreshold = nan\n", "detect.threshold: must be a finite number"),
    ("[detect]\ntreshold = 3.0\n", "detect.treshold: unknown key; did you mean detect.threshold?"),
    ("[detect\n", "not valid TOML"),
])
def test_check_config_rejects(tmp_path, capsys, text, message):
    path = tmp_path / "c.toml"
    path.write_text(text)
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("balancerd check-config: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_check_config_missing_file(tmp_path, capsys):
    assert main(["check-config", os.fspath(tmp_path / "nope.toml")]) == 2
    assert "nope.toml: cannot read: No such file or directory" in capsys.readouterr().err
