"""An all-to-all through the GPUs' copy engines: peer copies into a symmetric-memory workspace.

NCCL's all-to-all runs on the SMs, so expert GEMMs issued beside it slow down by about as much as
the overlap hides; copies between GPUs of one node (NVLink) can run on the copy engines instead and
leave every SM to the GEMMs. Each rank holds a workspace of the same size, mapped into every peer
(torch.distributed._symmetric_memory); a transfer writes each rank's rows for peer p straight into
p's workspace, at the offset p's layout gives them, then a barrier tells every rank its rows have
arrived. The received rows are laid out exactly as NCCL's all_to_all_single would lay them out.

Every rank must make the same transfers in the same order with the same region sizes (the
dispatch derives them from the gathered count matrix). A region is only rewritten after a collective
that every rank's readers of it precede: the dispatch's count exchange, once a layer (see
`CopyEngineTransport.begin`). Token ranges that run through the layers interleaved each have their
own count exchange, so each gets a lane: an equal part of the workspace with its own regions.
Intra-node only (one NVLink domain), CUDA only.
"""

from __future__ import annotations

from itertools import accumulate

import torch
import torch.distributed as dist

from kernels.permute import row_layout
from moe_runtime.streams import current_stream

ALIGN = 256  # bytes: every region starts aligned, so rows keep the alignment their layout gives them


def workspace_bytes(tokens: int, world: int, hidden: int, top_k: int, dtype: torch.dtype) -> int:
    """A workspace that holds any exact-dispatch layer of up to `tokens` tokens a rank: the rows that
    all ranks together can send one rank (a row per token each, with its slot ids and weights) and
    the results that can come back to one rank (a row per token and destination rank)."""
    rows_in = world * tokens * row_layout(hidden, top_k, dtype).width * dtype.itemsize
    rows_back = tokens * min(world, top_k) * hidden * dtype.itemsize
    return _round_up(rows_in, ALIGN) + _round_up(rows_back, ALIGN)


class Transfer:
    """A transfer in flight: `wait()` makes the current stream wait until every rank's rows arrived."""

    def __init__(self, done: torch.cuda.Event, device: torch.device):
        self._done, self._device = done, device

    def wait(self) -> None:
        current_stream(self._device).wait_event(self._done)


class CopyEngineTransport:
    """Variable all-to-alls by peer copies into a symmetric workspace of `workspace_bytes` a rank.

    Collective to build (every rank of `group` at once). Explicitly `destroy()`ed; it holds the
    workspace until then.
    """

    def __init__(self, group: dist.ProcessGroup, device: torch.device, workspace_bytes: int):
        import torch.distributed._symmetric_memory as symm

        if device.type != "cuda":
            raise ValueError(f"CopyEngineTransport needs CUDA devices, got {device}")
        if workspace_bytes <= 0:
            raise ValueError(f"CopyEngineTransport: workspace_bytes must be > 0, got {workspace_bytes}")
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.device = device
        self.bytes = workspace_bytes
        self._local = symm.empty(workspace_bytes, dtype=torch.uint8, device=device)
        self._handle = symm.rendezvous(self._local, group.group_name)
        self._peers = [self._handle.get_buffer(p, (workspace_bytes,), torch.uint8) for p in range(self.world)]
        self._stream = torch.cuda.Stream(device)  # the transfers' copies and barriers, beside compute
        self._lanes = {0: [0, workspace_bytes]}  # lane -> [next region's offset, end of the lane]

    def begin(self, lane: int = 0, lanes: int = 1) -> None:
        """Start a new round of regions in `lane` of `lanes` equal parts of the workspace: call right
        after a collective that every rank's readers of that lane's previous regions precede (the
        count exchange), identically on every rank."""
        if not 0 <= lane < lanes:
            raise ValueError(f"CopyEngineTransport: lane {lane} outside {lanes} lanes")
        size = self.bytes // lanes // ALIGN * ALIGN
        self._lanes[lane] = [lane * size, (lane + 1) * size]

    def start(self, x: torch.Tensor, send_splits: list[int], dst_offsets: list[int], recv_rows: int,
              region_rows: int, after: torch.cuda.Event | None = None,
              lane: int = 0) -> tuple[torch.Tensor, Transfer]:
        """Send rows of x [N, ...] (send_splits[p] to peer p, in peer order) so that they land at row
        dst_offsets[p] of p's region; returns my region's first recv_rows rows and the transfer.

        region_rows (the most rows any rank receives in this transfer) must be the same on every rank.
        The copies wait for `after` when given (x written), else for the current stream. The region
        is the next one in `lane` (see `begin`).
        """
        row_bytes = _row_bytes(x)
        size = _round_up(region_rows * row_bytes, ALIGN)
        cursor = self._lanes[lane]
        start, end = cursor
        if start + size > end:
            raise RuntimeError(f"CopyEngineTransport: a round needs more than its lane's {end - start} bytes "
                               f"left ({size}); build it with a larger workspace_bytes")
        cursor[0] = start + size
        x = x.contiguous()
        src = x.view(torch.uint8).view(x.shape[0], row_bytes)
        stream = self._stream
        if after is None:
            stream.wait_stream(current_stream(self.device))
        else:
            stream.wait_event(after)
        # A GPU runs its peer copies one after another at about the NVLink's full rate even from
        # separate streams (a trace showed it), so they share one stream: forking a stream a peer cost
        # the host about 0.3 ms a transfer, while the GPU waited for the next layer's work. Rank r
        # sends to r + 1, r + 2, ... so each peer has one writer at a time (in peer order every rank
        # first wrote to rank 0: 1.8 ms for what took 1.1), and its own rows last: a copy within a GPU
        # runs on the SMs, so it waits for a running GEMM, and the peer copies must not wait behind it.
        firsts = [0, *accumulate(send_splits)]
        with torch.cuda.stream(stream):
            for i in range(1, self.world + 1):
                p = (self.rank + i) % self.world
                rows = send_splits[p]
                if rows:
                    at = start + dst_offsets[p] * row_bytes
                    self._peers[p][at:at + rows * row_bytes].view(rows, row_bytes).copy_(
                        src[firsts[p]:firsts[p] + rows])
            self._handle.barrier(channel=0)
            done = torch.cuda.Event()
            done.record(stream)
        x.record_stream(stream)
        out = self._local[start:start + recv_rows * row_bytes].view(x.dtype).view(recv_rows, *x.shape[1:])
        return out, Transfer(done, self.device)

    def destroy(self) -> None:
        """Release the workspace (collective: every rank, once no transfer is in flight)."""
        torch.cuda.synchronize(self.device)
        self._peers, self._handle, self._local = [], None, None


def _row_bytes(x: torch.Tensor) -> int:
    n = 1
    for d in x.shape[1:]:
        n *= d
    return n * x.element_size()


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to
