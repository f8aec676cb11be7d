"""All-to-all by the copy engines (peer copies into symmetric memory) against NCCL's, alone and beside
GEMMs: the measurement behind `ep_group(copy_engine_bytes=...)`.

Each rank sends ROWS rows of hidden 4096 bf16 to every rank (about what exact dispatch sends at 16384
tokens a rank on 4 GPUs). Prints, from rank 0: each all-to-all's time and GB/s of remote bytes, whether
the copy-engine result equals NCCL's, and four 16384 x 4096 x 3072 GEMMs alone and with each
all-to-all running beside them on another stream:

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 torchrun --standalone --nproc-per-node 4 \\
        benchmarks/copy_engine_a2a.py
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe_runtime.group import PeerLayout, ep_group  # noqa: E402

ROWS, HIDDEN = 16384, 4096


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("copy_engine_a2a.py needs GPUs")
    local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=local)
    group = ep_group(copy_engine_bytes=(dist.get_world_size() * ROWS * HIDDEN * 2) + (1 << 20))
    rank, world = group.rank, group.world

    def timed(fn: Callable[[], object], calls: int = 10) -> float:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        dist.barrier(device_ids=[local.index])
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / calls

    def say(text: str) -> None:
        if rank == 0:
            print(text, flush=True)

    send = torch.randn(world * ROWS, HIDDEN, device=local, dtype=torch.bfloat16)
    recv = torch.empty_like(send)
    splits = [ROWS] * world
    layout = PeerLayout([rank * ROWS] * world, world * ROWS)

    def nccl() -> None:
        dist.all_to_all_single(recv, send)

    def copy_engines() -> torch.Tensor:
        group.copy_engine.begin()  # every rank's reads of the region ended with the last call's barrier
        out, transfer = group.all_to_all_start(send, splits, splits, layout=layout)
        transfer.wait()
        return out

    remote = (world - 1) * ROWS * HIDDEN * 2
    for name, fn in (("NCCL all_to_all_single", nccl), ("copy engines", copy_engines)):
        ms = timed(fn)
        say(f"{name:24s} {ms:7.3f} ms  {remote / ms / 1e6:5.0f} GB/s remote out a rank")
    nccl()
    same = torch.equal(copy_engines(), recv)
    say(f"copy-engine rows equal NCCL's: {same}")

    a = torch.randn(16384, 4096, device=local, dtype=torch.bfloat16)
    b = torch.randn(4096, 3072, device=local, dtype=torch.bfloat16)
    side = torch.cuda.Stream()

    def gemms() -> None:
        for _ in range(4):
            torch.mm(a, b)

    def beside(comm: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                comm()
            gemms()
            torch.cuda.current_stream().wait_stream(side)
        return run

    say(f"{'4 GEMMs alone':24s} {timed(gemms, 5):7.3f} ms")
    say(f"{'4 GEMMs + NCCL beside':24s} {timed(beside(nccl), 5):7.3f} ms")
    say(f"{'4 GEMMs + copy engines':24s} {timed(beside(copy_engines), 5):7.3f} ms")
    group.copy_engine.destroy()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
