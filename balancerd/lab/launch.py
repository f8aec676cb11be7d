"""Start one `python -m moe_runtime.bench_ep` process per GPU of this host and wait for them.

The processes meet over torch.distributed's env:// rendezvous on a free local port. Rank 0's stderr
(the progress lines) comes through to ours; every rank's output also goes to DIR/rank<r>.log. When a
rank fails, the others get a grace period to finish and are then stopped; so is everything at the
timeout.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

REPO = Path(__file__).resolve().parents[2]
GRACE_S = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pump(src, log: Path, echo: TextIO | None) -> None:
    with open(log, "wb") as f:
        for line in iter(src.readline, b""):
            f.write(line)
            f.flush()
            if echo is not None:
                echo.write(line.decode(errors="replace"))
                echo.flush()


def launch(bench_args: dict, world: int, out: Path, timeout_s: float, echo: TextIO | None) -> int:
    """Run the ranks; returns 0 when all exited 0, else the first non-zero exit status (124: timeout)."""
    out.mkdir(parents=True, exist_ok=True)
    args_path = out / "bench_args.json"
    args_path.write_text(json.dumps(bench_args, indent=1))
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": str(world), "PYTHONUNBUFFERED": "1"}
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    procs, pumps = [], []
    for rank in range(world):
        p = subprocess.Popen([sys.executable, "-m", "moe_runtime.bench_ep", str(args_path)], cwd=REPO,
                             env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        t = threading.Thread(target=_pump, daemon=True,
                             args=(p.stdout, out / f"rank{rank}.log", echo if rank == 0 else None))
        t.start()
        procs.append(p)
        pumps.append(t)
    rc = _wait(procs, time.monotonic() + timeout_s, echo)
    for t in pumps:
        t.join(timeout=5)
    return rc


def _wait(procs: list[subprocess.Popen], deadline: float, echo: TextIO | None) -> int:
    failed_at = None
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            return next((c for c in codes if c), 0)
        now = time.monotonic()
        if failed_at is None and any(c for c in codes if c is not None):
            failed_at = now
            if echo is not None:
                bad = [r for r, c in enumerate(codes) if c]
                echo.write(f"rank(s) {bad} failed; stopping the others within {GRACE_S:g} s\n")
        if now > deadline or (failed_at is not None and now - failed_at > GRACE_S):
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            codes = [p.returncode for p in procs]
            return 124 if now > deadline else next((c for c in codes if c), 1)
        time.sleep(0.2)
