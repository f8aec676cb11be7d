"""The daemon's configuration: a TOML file loaded into frozen, validated dataclasses.

One dataclass per TOML table; every field has a default, so an empty file is a valid configuration.
Each dataclass checks its own fields in ``__post_init__`` (types first, then ranges), so a config built
in Python is held to the same rules as one read from a file. Errors are :class:`ConfigError`, naming
the dotted key (``detect.threshold``) and the reason. TOML has no null: a key whose default is None is
left out of the file to keep that default.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from balancerd import protocol
from balancerd.log import LEVELS

__all__ = [
    "ApiConfig", "ConfigError", "DaemonConfig", "DetectConfig", "MetricsConfig", "PlannerConfig",
    "PolicyConfig", "WindowConfig", "load_config", "parse_config", "resolve_runtime_dir",
    "resolve_socket", "resolve_state_dir",
]

POLICY_KINDS = ("placement", "token", "drop")
POLICY_MODES = ("automatic", "paused")
# DeepSeek-V3 routed expert in bf16: gate, up and down projections of 7168 x 2048, 2 bytes each.
DEEPSEEK_V3_EXPERT_BYTES = 3 * 7168 * 2048 * 2
_JOB_RE = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")  # the protocol's rule for job ids
_ADDRESS_RE = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>\d{1,5})$")


class ConfigError(ValueError):
    """A configuration that cannot be used: ``key`` is the dotted key ("" for the file itself)."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key}: {reason}" if key else reason)
        self.key = key
        self.reason = reason


def _require(ok: bool, key: str, reason: str) -> None:
    if not ok:
        raise ConfigError(key, reason)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """``value`` checked against the type hint ``hint``: ints widen to float, lists become tuples."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    got = f"got {type(value).__name__} {value!r}"
    if hint is bool:
        _require(isinstance(value, bool), key, f"must be a boolean, {got}")
        return value
    if hint is int:
        _require(isinstance(value, int) and not isinstance(value, bool), key, f"must be an integer, {got}")
        return value
    if hint is float:
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), key,
                 f"must be a number, {got}")
        _require(math.isfinite(value), key, f"must be a finite number, {got}")
        return float(value)
    if hint is str:
        _require(isinstance(value, str), key, f"must be a string, {got}")
        return value
    if typing.get_origin(hint) is tuple:
        _require(isinstance(value, (list, tuple)), key, f"must be a list, {got}")
        item = typing.get_args(hint)[0]
        return tuple(_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value))
    _require(isinstance(value, hint), key, f"must be a [{key}] table, {got}")
    return value


def _check_types(obj: Any, section: str) -> None:
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        key = f"{section}.{f.name}" if section else f.name
        object.__setattr__(obj, f.name, _coerce(key, getattr(obj, f.name), hints[f.name]))


def _check_absolute(value: str | None, key: str) -> None:
    if value is not None:
        _require(value != "" and os.path.isabs(value), key, f"must be an absolute path, got {value!r}")


@dataclass(frozen=True)
class DetectConfig:
    """When a layer counts as imbalanced, and how often that may trigger a plan."""

    threshold: float = 3.0            # GPU max/min load above which a layer is imbalanced
    clear_threshold: float = 2.5      # a flagged layer clears only below this (hysteresis)
    sustain: int = 3                  # consecutive counted windows above threshold to flag a layer
    min_tokens: int = 4096            # a window with fewer assignments does not count
    cooldown_s: float = 30.0          # no new plan this long after the last one
    straggler_threshold: float = 1.5  # a rank busy this many times the median is a straggler

    def __post_init__(self) -> None:
        _check_types(self, "detect")
        _require(self.threshold > 1.0, "detect.threshold", f"must be > 1.0, got {self.threshold}")
        _require(1.0 <= self.clear_threshold <= self.threshold, "detect.clear_threshold",
                 f"must be in [1.0, threshold={self.threshold}], got {self.clear_threshold}")
        _require(self.sustain >= 1, "detect.sustain", f"must be >= 1, got {self.sustain}")
        _require(self.min_tokens >= 0, "detect.min_tokens", f"must be >= 0, got {self.min_tokens}")
        _require(self.cooldown_s >= 0.0, "detect.cooldown_s", f"must be >= 0, got {self.cooldown_s}")
        _require(self.straggler_threshold > 1.0, "detect.straggler_threshold",
                 f"must be > 1.0, got {self.straggler_threshold}")


@dataclass(frozen=True)
class WindowConfig:
    """How publish intervals are combined into the window the detector and planner see."""

    intervals: int = 8                # sliding window length, in publish intervals
    decay_half_life_s: float = 60.0   # half-life of the exponentially decayed load history

    def __post_init__(self) -> None:
        _check_types(self, "window")
        _require(self.intervals >= 1, "window.intervals", f"must be >= 1, got {self.intervals}")
        _require(self.decay_half_life_s > 0.0, "window.decay_half_life_s",
                 f"must be > 0, got {self.decay_half_life_s}")


@dataclass(frozen=True)
class PlannerConfig:
    """Arguments of :func:`balancerd.planner.plan`. ``max_moves_per_layer`` 0 is stored as None."""

    tolerance: float = 0.05             # leave a layer whose peak is within this of the best achievable
    max_moves_per_layer: int | None = None  # slot changes per layer per plan; None or 0: unlimited
    nodes: int = 1                      # GPUs are grouped into this many nodes, contiguously
    expert_groups: int = 1              # router groups (DeepSeek-V3: 8); 1 when the router has none

    def __post_init__(self) -> None:
        _check_types(self, "planner")
        _require(self.tolerance >= 0.0, "planner.tolerance", f"must be >= 0, got {self.tolerance}")
        if self.max_moves_per_layer is not None:
            _require(self.max_moves_per_layer >= 0, "planner.max_moves_per_layer",
                     f"must be >= 0 (0: unlimited), got {self.max_moves_per_layer}")
            if self.max_moves_per_layer == 0:
                object.__setattr__(self, "max_moves_per_layer", None)
        _require(self.nodes >= 1, "planner.nodes", f"must be >= 1, got {self.nodes}")
        _require(self.expert_groups >= 1, "planner.expert_groups", f"must be >= 1, got {self.expert_groups}")


@dataclass(frozen=True)
class PolicyConfig:
    """Which remedy the daemon applies, and the numbers that decide whether a plan is worth pushing."""

    kind: str = "placement"                 # placement | token | drop
    mode: str = "automatic"                 # automatic | paused (plan and report, never push)
    max_reroute_fraction: float = 0.02      # token policy: most assignments the bias may reroute
    capacity_factor: float = 1.25           # drop policy: slot capacity over the mean load
    expert_bytes: int = DEEPSEEK_V3_EXPERT_BYTES  # bytes of one expert's weights
    migration_bandwidth_gbps: float = 40.0  # GB/s (10^9 bytes/s) one expert copy is estimated to move at
    ack_timeout_s: float = 30.0             # a pushed plan not acknowledged in this time is abandoned
    gain_horizon_s: float = 600.0           # how long a plan is expected to keep paying off
    bias_step: float = 0.002                # token policy: most the bias moves per update (score units)
    bias_limit: float = 0.05                # token policy: the bias never goes below -bias_limit

    def __post_init__(self) -> None:
        _check_types(self, "policy")
        _require(self.kind in POLICY_KINDS, "policy.kind", f"must be one of {', '.join(POLICY_KINDS)}, "
                                                            f"got {self.kind!r}")
        _require(self.mode in POLICY_MODES, "policy.mode", f"must be one of {', '.join(POLICY_MODES)}, "
                                                            f"got {self.mode!r}")
        _require(0.0 < self.max_reroute_fraction < 1.0, "policy.max_reroute_fraction",
                 f"must be in (0, 1), got {self.max_reroute_fraction}")
        _require(self.capacity_factor > 1.0, "policy.capacity_factor",
                 f"must be > 1.0, got {self.capacity_factor}")
        _require(self.expert_bytes >= 1, "policy.expert_bytes", f"must be >= 1, got {self.expert_bytes}")
        positive = ("migration_bandwidth_gbps", "ack_timeout_s", "gain_horizon_s", "bias_step", "bias_limit")
        for name in positive:
            value = getattr(self, name)
            _require(value > 0.0, f"policy.{name}", f"must be > 0, got {value}")


@dataclass(frozen=True)
class ApiConfig:
    """The Unix socket serving the daemon's state (``balancerd status``, the TUI)."""

    socket: str | None = None   # None: <runtime_dir>/balancerd.sock
    group: str | None = None    # a group whose members may connect too; None: the daemon's uid only

    def __post_init__(self) -> None:
        _check_types(self, "api")
        _check_absolute(self.socket, "api.socket")
        if self.group is not None:
            _require(self.group != "", "api.group", "must not be empty (leave it out for uid-only access)")


@dataclass(frozen=True)
class MetricsConfig:
    """OpenTelemetry export. Per-expert series are opt-in: 256 experts x 58 layers is 15k series."""

    prometheus_address: str = "127.0.0.1:9464"   # host:port of the Prometheus scrape endpoint
    otlp_endpoint: str | None = None             # http(s) URL of an OTLP/HTTP collector; None: off
    expert_top_n: int = 0                        # export the N hottest experts of each layer
    expert_layers: tuple[int, ...] = ()          # export every expert of these layers

    def __post_init__(self) -> None:
        _check_types(self, "metrics")
        m = _ADDRESS_RE.match(self.prometheus_address)
        _require(m is not None, "metrics.prometheus_address",
                 f"must be host:port (e.g. 127.0.0.1:9464), got {self.prometheus_address!r}")
        port = int(m["port"])
        _require(1 <= port <= 65535, "metrics.prometheus_address", f"port must be in [1, 65535], got {port}")
        if self.otlp_endpoint is not None:
            _require(self.otlp_endpoint.startswith(("http://", "https://")), "metrics.otlp_endpoint",
                     f"must be an http:// or https:// URL, got {self.otlp_endpoint!r}")
        _require(self.expert_top_n >= 0, "metrics.expert_top_n", f"must be >= 0, got {self.expert_top_n}")
        for i, layer in enumerate(self.expert_layers):
            _require(layer >= 0, f"metrics.expert_layers[{i}]", f"must be >= 0, got {layer}")
        _require(len(set(self.expert_layers)) == len(self.expert_layers), "metrics.expert_layers",
                 f"must not repeat a layer, got {list(self.expert_layers)}")


@dataclass(frozen=True)
class DaemonConfig:
    """The whole configuration: top-level keys, then one field per table."""

    runtime_dir: str | None = None          # None: protocol.runtime_dir()
    state_dir: str = "/var/lib/balancerd"   # per-user fallback when not writable: resolve_state_dir()
    poll_interval_s: float = 0.1            # how often the rings are read
    log_level: str = "info"
    job: str | None = None                  # follow only this job; None: every job in runtime_dir
    detect: DetectConfig = field(default_factory=DetectConfig)
    window: WindowConfig = field(default_factory=WindowConfig)
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def __post_init__(self) -> None:
        _check_types(self, "")
        _check_absolute(self.runtime_dir, "runtime_dir")
        _check_absolute(self.state_dir, "state_dir")
        _require(0.0 < self.poll_interval_s <= 60.0, "poll_interval_s",
                 f"must be in (0, 60] seconds, got {self.poll_interval_s}")
        _require(self.log_level in LEVELS, "log_level",
                 f"must be one of {', '.join(LEVELS)}, got {self.log_level!r}")
        if self.job is not None:
            _require(_JOB_RE.match(self.job) is not None, "job",
                     f"must be 1-32 letters, digits, '_', '.', '-', got {self.job!r}")


_SECTIONS: dict[str, type] = {
    f.name: f.default_factory for f in dataclasses.fields(DaemonConfig)
    if f.default_factory is not dataclasses.MISSING
}


def _all_keys() -> list[str]:
    """Every valid dotted key, tables included."""
    keys = [f.name for f in dataclasses.fields(DaemonConfig)]
    for name, cls in _SECTIONS.items():
        keys += [f"{name}.{f.name}" for f in dataclasses.fields(cls)]
    return keys


def _unknown(key: str) -> ConfigError:
    """An unknown-key error suggesting the nearest valid key. A key put in the wrong table
    (``threshold`` at top level) is matched by its last part first."""
    keys = _all_keys()
    leaf = key.rsplit(".", 1)[-1]
    near = [k for k in keys if k.rsplit(".", 1)[-1] == leaf] or difflib.get_close_matches(key, keys, n=1)
    return ConfigError(key, f"unknown key; did you mean {near[0]}?" if near else "unknown key")


def parse_config(data: Mapping[str, Any]) -> DaemonConfig:
    """A validated :class:`DaemonConfig` from a mapping shaped like the TOML file."""
    top: dict[str, Any] = {}
    for key, value in data.items():
        if key in _SECTIONS:
            if not isinstance(value, Mapping):
                raise ConfigError(key, f"must be a table ([{key}]), got {type(value).__name__}")
            valid = {f.name for f in dataclasses.fields(_SECTIONS[key])}
            for sub in value:
                if sub not in valid:
                    raise _unknown(f"{key}.{sub}")
            top[key] = _SECTIONS[key](**value)
        elif key in {f.name for f in dataclasses.fields(DaemonConfig)}:
            top[key] = value
        else:
            raise _unknown(key)
    return DaemonConfig(**top)


def load_config(path: str | os.PathLike) -> DaemonConfig:
    """Read and validate a TOML file. Every failure, including a missing file, is a ConfigError."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError("", f"{path}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError("", f"{path}: not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    return parse_config(data)


def _writable_dir(path: Path) -> bool:
    """``path`` is (or can be created as) a directory this process may write to."""
    try:
        path.mkdir(mode=0o750, parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


def resolve_state_dir(cfg: DaemonConfig) -> Path:
    """``cfg.state_dir`` when writable (created if needed), else $XDG_STATE_HOME/balancerd, else
    ~/.local/state/balancerd: a daemon started by hand as an ordinary user still keeps its state."""
    configured = Path(cfg.state_dir)
    if _writable_dir(configured):
        return configured
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    fallback = Path(base) / "balancerd"
    fallback.mkdir(mode=0o700, parents=True, exist_ok=True)
    return fallback


def resolve_runtime_dir(cfg: DaemonConfig) -> Path:
    """``cfg.runtime_dir`` (created if needed), else the protocol's default."""
    if cfg.runtime_dir is None:
        return protocol.runtime_dir()
    path = Path(cfg.runtime_dir)
    path.mkdir(mode=0o770, parents=True, exist_ok=True)
    return path


def resolve_socket(cfg: DaemonConfig) -> Path:
    """The API socket path: ``api.socket``, else <runtime_dir>/balancerd.sock."""
    if cfg.api.socket is not None:
        return Path(cfg.api.socket)
    return resolve_runtime_dir(cfg) / "balancerd.sock"
