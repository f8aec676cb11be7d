"""Where telemetry's cost goes in an eager, launch-bound step: three modes of one stack, side by side.

Modes: "off" (no counters), "count" (counters attached, recording on, phases never timed, no
controller) and "on" (counters + a PlanController publishing every 16 steps, one step in 16 timed:
what serving runs). Blocks of 16 steps rotate through the modes (each block starts from a barrier;
every step is timed whole on the host, the device synchronized before and after). Then rank 0
profiles --profile-blocks blocks of each mode with cProfile (host time by function, the step's host
work only) and --device-steps steps of "off" and "count" with torch.profiler (device time by
kernel), each table a file:

    NCCL_NVLS_ENABLE=0 torchrun --standalone --nproc-per-node 2 benchmarks/telemetry_probe.py \\
        --tokens 64 --rounds 150 --out $OUT/probe

Prints each mode's mean and median step per rank and writes DIR/times-rank<r>.txt,
DIR/host-<mode>.txt and DIR/device-<mode>.txt. `--device cpu --tiny` runs it on gloo (smoke test).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # run as a file: the repo root must come first
    sys.path[0] = str(Path(__file__).resolve().parents[1])
sys.path.append(str(Path(__file__).resolve().parent))  # runtime_gpu as a file

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from runtime_gpu import default_out, init_distributed, sync  # noqa: E402

from moe_runtime import Counters, DispatchConfig, EPMoEStack, MoEConfig, RuntimePlacement  # noqa: E402
from moe_runtime.controller import PlanController  # noqa: E402
from moe_runtime.synthetic import device_weights, load_layers  # noqa: E402
from moe_runtime.telemetry import TelemetryConfig  # noqa: E402

MODES = ("off", "count", "on")
BLOCK = 16


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="qwen3-235b-a22b", choices=("qwen3-235b-a22b", "deepseek-v3"))
    p.add_argument("--tokens", type=int, default=64, help="tokens per rank")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=150, help="timed blocks of 16 steps per mode")
    p.add_argument("--profile-blocks", type=int, default=20,
                   help="blocks of 16 steps per mode under cProfile")
    p.add_argument("--device-steps", type=int, default=2 * BLOCK,
                   help="steps of off and count under torch.profiler (0: none)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="small shapes (CPU smoke test)")
    p.add_argument("--out", type=Path, default=default_out())
    args = p.parse_args(argv)

    group = init_distributed(args.device, 120)
    small = dict(hidden=64, intermediate=32) if args.tiny else {}
    cfg = MoEConfig.preset(args.model, layers=args.layers, **small)
    dtype = torch.bfloat16 if group.device.type == "cuda" else torch.float32
    k = cfg.experts // group.world + 2
    placement = RuntimePlacement.initial(cfg.layers, cfg.experts, group.world, k, group.device)
    counters = Counters(cfg.layers, cfg.experts, k, group.device)
    stack = EPMoEStack(cfg, group, placement, dispatch=DispatchConfig("exact"), counters=counters,
                       dtype=dtype)
    load_layers(stack, lambda layer: device_weights(cfg, layer, 0, group.device, dtype), keep=False)
    inputs = [torch.randn(args.tokens, cfg.hidden, device=group.device, dtype=dtype) for _ in range(4)]
    args.out.mkdir(parents=True, exist_ok=True)
    on_step = 0

    with tempfile.TemporaryDirectory(prefix="balancerd-probe-") as runtime:
        controller = PlanController(stack, placement, group, counters,
                                    telemetry=TelemetryConfig(job=f"probe{group.rank}", directory=runtime))

        def block(mode: str, steps: int = BLOCK, host: cProfile.Profile | None = None) -> list[float]:
            nonlocal on_step
            for layer in stack.layers:
                layer.counters = None if mode == "off" else counters
            if mode == "count":
                counters.set_timing(False)
            if group.world > 1:
                dist.barrier()
            times = []
            for i in range(steps):
                sync(group.device)
                start = time.perf_counter()
                if host:
                    host.enable()
                stack(inputs[i % len(inputs)])
                if mode == "on":
                    controller.after_step(on_step, args.tokens)
                    on_step += 1
                if host:
                    host.disable()
                sync(group.device)
                times.append(time.perf_counter() - start)
            return times

        try:
            with torch.no_grad():
                for mode in MODES:
                    block(mode, 2 * BLOCK)
                times: dict[str, list[float]] = {mode: [] for mode in MODES}
                for r in range(args.rounds):
                    for mode in MODES[r % 3:] + MODES[:r % 3]:
                        times[mode] += block(mode)
                hosts = {mode: cProfile.Profile() for mode in MODES}
                for _ in range(args.profile_blocks):
                    for mode in MODES:
                        block(mode, host=hosts[mode] if group.rank == 0 else None)
                devices = {}
                for mode in ("off", "count") if args.device_steps else ():
                    with torch.profiler.profile() as prof:
                        block(mode, args.device_steps)
                    devices[mode] = prof
        finally:
            controller.close()

    lines = [f"{mode}: mean {statistics.fmean(t) * 1e3:.4f} ms, median {statistics.median(t) * 1e3:.4f} ms, "
             f"{len(t)} steps" for mode, t in times.items()]
    (args.out / f"times-rank{group.rank}.txt").write_text("\n".join(lines) + "\n")
    print(f"rank {group.rank}", *lines, sep="\n", flush=True)
    if group.rank == 0:
        for mode, profile in hosts.items():
            text = io.StringIO()
            pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(400)
            (args.out / f"host-{mode}.txt").write_text(text.getvalue())
        key = "self_cuda_time_total" if group.device.type == "cuda" else "self_cpu_time_total"
        for mode, prof in devices.items():
            table = prof.key_averages().table(sort_by=key, row_limit=60, max_name_column_width=70)
            (args.out / f"device-{mode}.txt").write_text(table)
    if group.world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
