"""The closed loop with real parts, for the safety tests: a real `balancerd run` daemon process, W real
rank processes in one gloo group serving a small skewed MoE stack under PlanController, real
shared-memory segments in temporary runtime directories.

    with Harness(tmp_path) as h:
        daemon = h.daemon(runtime)                       # `balancerd run --config <tmp>.toml`
        world = h.world(RankArgs(world=2), [runtime] * 2)  # `python loop_harness.py ARGS.json`, forking
        wait_until(lambda: ..., h, "...")                # fails fast when a process died
        results = world.stop()                           # every rank stops at the same step

Each rank checks its output against the single-process dense reference at *every* step and records,
per step, the wall time the forward began, whether a migration was in flight during it, the
placement version after the step and the relative error; and every change of its status (result,
version, reason). A rank stops when a stop file appears (the ranks agree on the step with a one-int
all-reduce, so they all stop together) or after ``max_steps``.

``gate_file``: while a migration is in flight and the file does not exist yet, each step first waits
for it (up to ``gate_timeout_s``). A test uses it to act (kill the daemon) while a migration is
provably in flight, however loaded the two cores are; the migration itself is not changed.

Every process started here is killed on :meth:`Harness.close`, also when a test fails.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from balancerd.api import ApiClient, DaemonUnavailable
from balancerd.protocol import StatusRecord, read_status, status_path

WAIT_S = 40.0
HERE = Path(__file__).resolve()


def balancerd_cli() -> list[str]:
    """The installed `balancerd` console script next to this interpreter, else `python -m balancerd.cli`."""
    script = Path(sys.executable).with_name("balancerd")
    return [str(script)] if script.exists() else [sys.executable, "-m", "balancerd.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable, harness: Harness | None = None, what: str = "the condition",
               timeout: float = WAIT_S, poll_s: float = 0.02):
    """tests.polling.wait_until; with a harness, a process that died meanwhile fails the wait at once,
    with its log."""
    from tests import polling  # here: this file also runs as the ranks' launcher, outside the test tree

    return polling.wait_until(predicate, timeout, what, poll_s=poll_s,
                              check=None if harness is None else harness.check)


# ---------------------------------------------------------------------------------------------------
# The daemon


DAEMON_CONFIG = """\
runtime_dir = "{runtime}"
state_dir = "{state}"
poll_interval_s = 0.05
job = "{job}"

[detect]
threshold = 3.0
clear_threshold = 2.5
sustain = 2
min_tokens = {min_tokens}
cooldown_s = {cooldown_s}

[window]
intervals = 4

[policy]
kind = "{policy}"
mode = "{mode}"
expert_bytes = {expert_bytes}
migration_bandwidth_gbps = 1.0
ack_timeout_s = 60.0

[metrics]
prometheus_address = "127.0.0.1:{port}"
"""


class DaemonProcess:
    """`balancerd run` on a temp config; its state dir and log live in the harness's work dir."""

    def __init__(self, work: Path, name: str, runtime: Path, job: str, **options):
        self.name, self.runtime, self.job = name, Path(runtime), job
        self.config = work / f"{name}.toml"
        self.state_dir = work / f"{name}-state"
        self.log_path = work / f"{name}.log"
        self.socket = self.runtime / "balancerd.sock"
        opts = {"min_tokens": 200, "cooldown_s": 5.0, "policy": "placement", "mode": "automatic",
                "expert_bytes": 3 * 16 * 8 * 4, **options}
        self.config.write_text(DAEMON_CONFIG.format(runtime=self.runtime, state=self.state_dir, job=job,
                                                    port=free_port(), **opts))
        self.proc: subprocess.Popen | None = None

    def start(self) -> DaemonProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([*balancerd_cli(), "run", "--config", str(self.config)],
                                         stdout=log, stderr=log)
        wait_until(lambda: self._answer({"op": "status"}) is not None, what=f"daemon {self.name} to answer")
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check(self) -> None:
        if self.proc is not None and self.proc.poll() not in (None, -signal.SIGKILL, 0):
            raise RuntimeError(f"daemon {self.name} exited with {self.proc.returncode}:\n"
                               f"{self.log()[-3000:]}")

    def _answer(self, request: dict) -> dict | None:
        self.check()
        try:
            return ApiClient(self.socket, timeout=10.0).request(request)
        except (DaemonUnavailable, ConnectionError, FileNotFoundError):
            return None

    def request(self, op: str, **fields) -> dict:
        """One API request; the response must be ok."""
        response = self._answer({"op": op, **fields})
        assert response is not None, f"daemon {self.name} does not answer"
        assert response.get("ok"), f"daemon {self.name} refused {op}: {response}"
        return response

    def state(self) -> dict:
        return self.request("status")["state"]

    def job_state(self) -> dict | None:
        return self.state()["jobs"].get(self.job)

    def status_cli(self) -> dict:
        """What an operator sees: `balancerd status --json` as a process."""
        r = subprocess.run([*balancerd_cli(), "status", "--json", "--socket", str(self.socket)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        return json.loads(r.stdout)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive:
            self.proc.send_signal(sig)
            self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM; SIGKILL if it does not stop within 5 s."""
        if not self.alive:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------------------------------------------
# The ranks


@dataclass
class RankArgs:
    world: int = 2
    job: str = "loop"
    layers: int = 4
    experts: int = 8
    slots_per_rank: int = 6
    hidden: int = 16
    intermediate: int = 8
    top_k: int = 2
    tokens: int = 48
    skew: float = 1.5
    seed: int = 0
    interval_steps: int = 2
    layers_per_step: int = 1
    global_view: bool = True
    max_steps: int = 20000
    gate_timeout_s: float = 20.0
    # filled in by World
    init_method: str = ""
    runtime_dirs: list[str] = field(default_factory=list)
    out_dir: str = ""
    stop_file: str = ""
    gate_file: str | None = None


class World:
    """W rank processes joined by one gloo group. One launcher process (`python loop_harness.py
    ARGS.json`) imports torch once and forks the ranks, which saves a torch import per rank on a small
    machine; each rank is still its own process with its own log, result and exit status."""

    def __init__(self, work: Path, name: str, args: RankArgs, runtime_dirs: list[Path], gate: bool = False):
        if len(runtime_dirs) != args.world:
            raise ValueError("one runtime directory per rank")
        self.name, self.work = name, work / name
        self.work.mkdir()
        self.args = args
        args.init_method = f"file://{self.work / 'store'}"
        args.runtime_dirs = [str(d) for d in runtime_dirs]
        args.out_dir = str(self.work)
        args.stop_file = str(self.work / "stop")
        args.gate_file = str(self.work / "gate") if gate else None
        (self.work / "args.json").write_text(json.dumps(asdict(args)))
        self.launcher: subprocess.Popen | None = None

    def start(self) -> World:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        with open(self.work / "launcher.log", "ab") as log:
            self.launcher = subprocess.Popen([sys.executable, str(HERE), str(self.work / "args.json")],
                                             stdout=log, stderr=log, env=env)
        return self

    def _log(self, name: str) -> str:
        path = self.work / name
        return path.read_text()[-3000:] if path.exists() else ""

    def check(self) -> None:
        """Raise, with the logs, as soon as a rank (or the launcher) failed."""
        for r in range(self.args.world):
            code = self.work / f"rank{r}.exit"
            if code.exists() and code.read_text().strip() not in ("", "0"):
                raise RuntimeError(f"{self.name} rank {r} exited with {code.read_text()}:\n"
                                   f"{self._log(f'rank{r}.log')}")
        if self.launcher is not None and self.launcher.poll() not in (None, 0):
            raise RuntimeError(f"{self.name} launcher exited with {self.launcher.returncode}:\n"
                               f"{self._log('launcher.log')}")

    def open_gate(self) -> None:
        Path(self.args.gate_file).touch()

    def status(self, rank: int) -> StatusRecord | None:
        """The rank's status block as the daemon reads it (None before it exists)."""
        return read_status(status_path(Path(self.args.runtime_dirs[rank]), self.args.job, rank))

    def statuses(self) -> list[StatusRecord | None]:
        return [self.status(r) for r in range(self.args.world)]

    def generation(self) -> int | None:
        """The generation every rank reports in its status block, once they all do."""
        gens = {None if s is None else s.generation for s in self.statuses()}
        return gens.pop() if len(gens) == 1 and None not in gens else None

    def stop(self, timeout: float = 60.0) -> list[dict]:
        """Ask the ranks to stop (they agree on the step), wait, and return their results."""
        Path(self.args.stop_file).touch()
        if self.args.gate_file:
            self.open_gate()
        try:
            self.launcher.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise TimeoutError(f"{self.name} did not stop within {timeout:.0f} s") from None
        self.check()
        return [json.loads((self.work / f"rank{r}.json").read_text()) for r in range(self.args.world)]

    def kill(self) -> None:
        """SIGKILL the ranks (by the pids the launcher recorded) and the launcher."""
        pids = self.work / "pids.json"
        if self.launcher is not None and self.launcher.poll() is None and pids.exists():
            for pid in json.loads(pids.read_text()).values():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.launcher is not None and self.launcher.poll() is None:
            self.launcher.kill()
            self.launcher.wait()


class Harness:
    """Owns every process a test starts; :meth:`close` kills what is left."""

    def __init__(self, work: Path):
        self.work = Path(work)
        self.daemons: list[DaemonProcess] = []
        self.worlds: list[World] = []

    def runtime_dir(self, name: str) -> Path:
        path = self.work / name
        path.mkdir(mode=0o770)
        return path

    def daemon(self, runtime: Path, name: str = "daemon", job: str = "loop", start: bool = True,
               **options) -> DaemonProcess:
        d = DaemonProcess(self.work, name, runtime, job, **options)
        self.daemons.append(d)
        return d.start() if start else d

    def world(self, args: RankArgs, runtime_dirs: list[Path], name: str = "world",
              gate: bool = False) -> World:
        w = World(self.work, name, args, runtime_dirs, gate)
        self.worlds.append(w)
        return w.start()

    def check(self) -> None:
        for d in self.daemons:
            d.check()
        for w in self.worlds:
            w.check()

    def close(self) -> None:
        for w in self.worlds:
            w.kill()
        for d in self.daemons:
            d.stop()

    def __enter__(self) -> Harness:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------
# One rank (run as a script)


def _serve(args: RankArgs, rank: int) -> dict:
    import torch
    import torch.distributed as dist

    from moe_runtime import MoEConfig
    from moe_runtime.controller import ControllerConfig
    from moe_runtime.demo_rank import build_skewed_rank
    from moe_runtime.reference import dense_stack
    from moe_runtime.telemetry import TelemetryConfig

    cfg = MoEConfig.preset("qwen3-235b-a22b", layers=args.layers, experts=args.experts, hidden=args.hidden,
                           intermediate=args.intermediate, top_k=args.top_k)
    telemetry = TelemetryConfig(job=args.job, interval_steps=args.interval_steps,
                                directory=args.runtime_dirs[rank], global_view=args.global_view)
    r = build_skewed_rank(cfg, rank, args.world, args.slots_per_rank, args.skew, args.seed, telemetry,
                          ControllerConfig(layers_per_step=args.layers_per_step,
                                           reopen_steps=args.interval_steps))
    stack, placement, controller = r.stack, r.placement, r.controller
    stop, gate = Path(args.stop_file), Path(args.gate_file) if args.gate_file else None
    steps: dict[str, list] = {"t": [], "migrating": [], "version": [], "err": []}
    changes, last = [], None
    try:
        for step in range(args.max_steps):
            migrating = controller.migrating
            if migrating and gate is not None and not gate.exists():
                deadline = time.monotonic() + args.gate_timeout_s
                while not gate.exists() and time.monotonic() < deadline:
                    time.sleep(0.005)
            x = torch.randn(args.tokens, cfg.hidden, generator=r.gen)
            t = time.time()
            with torch.no_grad():
                out = stack(x)
                ref = dense_stack(x, r.weights, cfg, selection_bias=r.bias)
            steps["err"].append(float((out - ref).abs().max() / ref.abs().max()))
            controller.after_step(step, args.tokens)
            steps["t"].append(t)
            steps["migrating"].append(migrating)
            steps["version"].append(placement.version)
            s = controller.status
            now = (s.result.name, s.result_version, s.reason.name, s.applied_version, s.pending_version)
            if now != last:
                changes.append([step, *now, s.detail])
                last = now
            flag = torch.tensor([int(stop.exists())], dtype=torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item():
                break
    finally:
        controller.close()
    control = controller._control  # the leader's reader of the control block, if it opened one
    return {"rank": rank, "generation": controller.generation, "steps": steps, "changes": changes,
            "control_invalid": None if control is None else control.invalid,
            "rejected_control": controller.rejected_control, "host": placement.host.tolist()}


def _rank_main(args: RankArgs, rank: int) -> None:
    from moe_runtime.demo_rank import gloo_rank

    with gloo_rank(args.init_method, rank, args.world, args.seed, timeout_s=60):
        result = _serve(args, rank)
    out = Path(args.out_dir) / f"rank{rank}.json"
    out.with_suffix(".tmp").write_text(json.dumps(result))
    os.replace(out.with_suffix(".tmp"), out)


def _die_with(parent: int) -> None:
    """SIGKILL this process when ``parent`` goes away (Linux), so a killed launcher leaves no rank."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


def main(argv: list[str]) -> int:
    """The launcher: import torch once, fork one process per rank, reap them. A rank that fails gets
    the others killed (they would wait in a collective until the gloo timeout)."""
    import traceback

    import torch  # noqa: F401  (imported once, before forking)
    import torch.distributed  # noqa: F401

    import moe_runtime.controller  # noqa: F401
    import moe_runtime.demo_rank  # noqa: F401
    import moe_runtime.reference  # noqa: F401

    args = RankArgs(**json.loads(Path(argv[0]).read_text()))
    work, me = Path(args.out_dir), os.getpid()
    ranks: dict[int, int] = {}
    for rank in range(args.world):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                _die_with(me)
                fd = os.open(work / f"rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                _rank_main(args, rank)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        ranks[pid] = rank
    (work / "pids.json").write_text(json.dumps({str(r): pid for pid, r in ranks.items()}))
    failed = False
    while ranks:
        pid, status = os.waitpid(-1, 0)
        rank = ranks.pop(pid, None)
        if rank is None:
            continue
        code = os.waitstatus_to_exitcode(status)
        (work / f"rank{rank}.exit").write_text(str(code))
        if code != 0 and not failed:
            failed = True
            for other in ranks:
                os.kill(other, signal.SIGKILL)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
