"""Permute token rows for dispatch, group them by local slot for the expert GEMM, and reverse both.

Source side: `drop_overflow` (the drop policy), `route_rows` (which row of the send buffer each
(rank, token) pair takes) and `pack`, which writes one row per (destination rank, token): the
token's hidden vector and, after it, k local slot ids (-1 where that assignment lives elsewhere)
and k weights, so a single all-to-all carries rows and metadata. `combine` sums the rows that come
back per token. Destination side: `group_by_slot` sorts the received assignments by local slot
(device-side segment offsets), `gather_rows` lays the rows out slot-major for the expert GEMM and
`unpermute` returns each row's weighted sum of its assignments' outputs; `count_slots` adds the
received assignments per local slot into a telemetry counter.

Index bookkeeping is plain torch on the device (sorts, cumsums, scatters: no host sync). The data
movers `pack`, `gather_rows`, `unpermute` and `combine`, and `count_slots`, run Triton kernels
(kernels/permute_triton.py) on CUDA tensors and their torch references on CPU; `force_triton` runs
the kernel on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1 set before the first
call), for tests.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

# Bytes. Rows and their metadata start aligned, and a bf16 row stride is a multiple of 16 elements,
# which Triton specializes on: the expert GEMM's loads of received rows then vectorize.
ROW_ALIGN = 32


class RowLayout(NamedTuple):
    width: int  # elements of the row dtype per row
    meta: int   # int32 column where the k slot ids start (the k float32 weights follow)


class Routes(NamedTuple):
    send: torch.Tensor      # [W, T] int32 row of (rank, token) in the send buffer, -1 where none is written
    result: torch.Tensor    # [W, T] int32 row whose result comes back to the token, -1 where none
    per_rank: torch.Tensor  # [W] int64 rows holding work for each rank


class SlotCount(NamedTuple):
    """Telemetry riding on a destination-side kernel: counts[s] += (assignments in slots to s) * record."""

    slots: torch.Tensor            # [R, k] local slot ids, -1 unused (may be a strided view)
    counts: torch.Tensor           # [K] int32, added into
    record: torch.Tensor | None    # 0-d int32 device flag, or None for always


class SlotGroups(NamedTuple):
    rows: torch.Tensor     # [R * k] int32 received row of each assignment, sorted by local slot (stable)
    offsets: torch.Tensor  # [K + 1] int32 start of each slot's segment; offsets[K] = assignments in use
    pos: torch.Tensor      # [R, k] int32 position of each assignment in that order, -1 where unused


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def row_layout(hidden: int, top_k: int, dtype: torch.dtype) -> RowLayout:
    """Columns of one send row: `hidden` values, padding to ROW_ALIGN bytes, then 2k int32 of metadata."""
    size = dtype.itemsize
    if ROW_ALIGN % size:
        raise ValueError(f"rows of {dtype} cannot be {ROW_ALIGN}-byte aligned")
    x_bytes = _round_up(hidden * size, ROW_ALIGN)
    return RowLayout((x_bytes + _round_up(8 * top_k, ROW_ALIGN)) // size, x_bytes // 4)


def use_triton(t: torch.Tensor, force: bool) -> bool:
    """CUDA tensors take the Triton kernel; CPU tensors only when forced under the interpreter."""
    if t.is_cuda:
        return True
    if force and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise RuntimeError("force_triton on CPU tensors needs TRITON_INTERPRET=1 set before the first call")
    return force


def drop_overflow(phys: torch.Tensor, weights: torch.Tensor,
                  capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The drop policy: per physical slot keep the `capacity` assignments with the largest weight.

    phys [T, k] physical slots, weights [T, k] (>= 0, as routing weights are). Ties go to the
    lower token. Returns keep [T, k] bool and the assignments dropped (0-d int64).
    """
    flat = phys.reshape(-1).long()
    # Non-negative float32 bits order like the values: one int64 key sorts by slot, then weight descending;
    # the stable sort keeps token order among equal weights (a token sends a slot at most one assignment).
    bits = weights.float().contiguous().view(torch.int32).reshape(-1).long()
    order = torch.argsort((flat << 31) | (0x7FFFFFFF - bits), stable=True)
    slot = flat[order]
    rank = torch.arange(flat.numel(), device=flat.device) - torch.searchsorted(slot, slot)
    keep = torch.empty_like(flat, dtype=torch.bool).scatter_(0, order, rank < capacity)
    return keep.view(phys.shape), flat.numel() - keep.sum()


def route_rows(dest: torch.Tensor, world: int, padded: bool) -> Routes:
    """Rows for dest [T, k] ranks (-1: dropped): one per (rank, token) with work there.

    Compact (exact mode): rank by rank, tokens ascending, only pairs with work. Padded (capacity
    mode): row w * T + t for every pair; pairs without work carry zeros and slot ids -1.
    """
    tokens = dest.shape[0]
    on_rank = (dest.unsqueeze(0) == torch.arange(world, device=dest.device).view(world, 1, 1)).any(-1)
    if padded:
        index = torch.arange(world * tokens, dtype=torch.int32, device=dest.device).view(world, tokens)
    else:
        index = (on_rank.reshape(-1).cumsum(0) - 1).to(torch.int32).view(world, tokens)
    result = torch.where(on_rank, index, -1)
    return Routes(index if padded else result, result, on_rank.sum(1))


def pack_reference(x: torch.Tensor, dest: torch.Tensor, local: torch.Tensor, weights: torch.Tensor,
                   send: torch.Tensor, rows: int) -> torch.Tensor:
    """Torch reference of `pack`; padding bytes are zero."""
    world, tokens = send.shape
    k = dest.shape[1]
    layout = row_layout(x.shape[1], k, x.dtype)
    buf = x.new_zeros((rows + 1, layout.width))  # the extra row takes every pair that is not written
    target = torch.where(send >= 0, send, rows).reshape(-1).long()
    here = dest.unsqueeze(0) == torch.arange(world, device=x.device).view(world, 1, 1)  # [W, T, k]
    values = torch.where(here.any(-1, keepdim=True), x.unsqueeze(0), 0)
    buf[target, :x.shape[1]] = values.reshape(world * tokens, x.shape[1])
    meta = buf.view(torch.int32)[:, layout.meta:layout.meta + 2 * k]
    meta[target, :k] = torch.where(here, local.to(torch.int32), -1).reshape(-1, k)
    meta[target, k:] = torch.where(here, weights.float(), 0.0).reshape(-1, k).view(torch.int32)
    return buf[:rows]


def pack(x: torch.Tensor, dest: torch.Tensor, local: torch.Tensor, weights: torch.Tensor, send: torch.Tensor,
         rows: int, force_triton: bool = False) -> torch.Tensor:
    """The send buffer [rows, row_layout(H, k).width] in x's dtype.

    Row send[w, t] (where >= 0) holds x[t] if token t has an assignment on rank w (else zeros), the
    local slots of those assignments and their weights (-1 / 0 for the others). dest [T, k] holds
    each assignment's rank (-1: dropped), local [T, k] its slot there, weights [T, k] float32.
    """
    if use_triton(x, force_triton):
        from kernels.permute_triton import pack_triton

        return pack_triton(x, dest, local, weights, send, rows)
    return pack_reference(x, dest, local, weights, send, rows)


def unpack(buf: torch.Tensor, hidden: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views of a received buffer: x [R, H], slots [R, k] int32, weights [R, k] float32."""
    meta = row_layout(hidden, top_k, buf.dtype).meta
    words = buf.view(torch.int32)
    weights = words[:, meta + top_k:meta + 2 * top_k].view(torch.float32)
    return buf[:, :hidden], words[:, meta:meta + top_k], weights


def combine_reference(back: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """Torch reference of `combine` (float32, nothing added)."""
    picked = back.float()[result.clamp(min=0).long()]  # [W, T, H]
    return torch.where(result.unsqueeze(-1) >= 0, picked, 0.0).sum(0)


def combine(back: torch.Tensor, result: torch.Tensor, force_triton: bool = False, *,
            out: torch.Tensor | None = None, add: torch.Tensor | None = None,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[T, H] in `dtype`: per token, the float32 sum of the rows of back [N, H] that result [W, T] names
    (-1: none), plus add [T, H] when given (e.g. the shared experts' output), rounded once at the end.

    `out` (contiguous [T, H] of `dtype`, e.g. a token range of a larger result) receives it instead of a
    new tensor.
    """
    tokens, hidden = result.shape[1], back.shape[1]
    if out is not None and (out.shape != (tokens, hidden) or out.dtype != dtype or not out.is_contiguous()):
        raise ValueError(f"combine: out must be contiguous [{tokens}, {hidden}] {dtype}, "
                         f"got {list(out.shape)} {out.dtype}")
    if add is not None and add.shape != (tokens, hidden):
        raise ValueError(f"combine: add must be [{tokens}, {hidden}], got {list(add.shape)}")
    if out is None:
        out = torch.empty((tokens, hidden), dtype=dtype, device=back.device)
    if use_triton(back, force_triton):
        from kernels.permute_triton import combine_triton

        return combine_triton(back, result, out, add)
    summed = combine_reference(back, result)
    return out.copy_(summed if add is None else summed + add.float())


def slot_order(slots: torch.Tensor, slots_per_rank: int) -> torch.Tensor:
    """Flat indices into slots [R, k] sorted by slot (stable), unused (-1) entries last."""
    key = torch.where(slots < 0, slots_per_rank, slots).reshape(-1)
    return torch.argsort(key, stable=True)


def group_by_slot(slots: torch.Tensor, slots_per_rank: int) -> SlotGroups:
    """Sort the assignments of slots [R, k] (-1 unused) by local slot, with device-side segment offsets."""
    k = slots.shape[1]
    key = torch.where(slots < 0, slots_per_rank, slots).reshape(-1).long()
    order = torch.argsort(key, stable=True)
    # Segment starts from the sorted keys: no atomics (an index_add over every assignment into K
    # counters took 0.37 ms a layer at 16384 tokens a rank on 4 H200s) and fewer ops.
    bounds = torch.arange(slots_per_rank + 1, device=slots.device)
    offsets = torch.searchsorted(key[order], bounds, out_int32=True)
    pos = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=slots.device))
    pos = torch.where(key < slots_per_rank, pos, -1).to(torch.int32).view(slots.shape)
    return SlotGroups((order // k).to(torch.int32), offsets, pos)


def gather_rows_reference(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Torch reference of `gather_rows` (it also fills the rows past the last segment)."""
    return x[rows.long()]


def gather_rows(x: torch.Tensor, groups: SlotGroups, count: int | None = None,
                force_triton: bool = False) -> torch.Tensor:
    """[count, H]: x's rows in slot-major order; rows past groups.offsets[-1] are left unwritten.

    `count` (default R * k) is a host bound on offsets[-1], e.g. the exact count in exact mode.
    """
    rows = groups.rows if count is None else groups.rows[:count]
    if use_triton(x, force_triton):
        from kernels.permute_triton import gather_rows_triton

        return gather_rows_triton(x, rows, groups.offsets)
    return gather_rows_reference(x, rows)


def unpermute_reference(ys: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor,
                        dtype: torch.dtype) -> torch.Tensor:
    """Torch reference of `unpermute`."""
    if ys.shape[0] == 0:  # no assignments: every pos is -1, and there is no row 0 to index
        return torch.zeros((pos.shape[0], ys.shape[1]), dtype=dtype, device=ys.device)
    picked = ys.float()[pos.clamp(min=0).long()]  # [R, k, H]
    return torch.where(pos.unsqueeze(-1) >= 0, picked * weights.unsqueeze(-1), 0.0).sum(1).to(dtype)


def unpermute(ys: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype,
              force_triton: bool = False, *, count: SlotCount | None = None) -> torch.Tensor:
    """[R, H] in `dtype`: row r's float32 sum over j of weights[r, j] * ys[pos[r, j]] (pos -1: skipped).

    With `count`, also `count_slots(count.slots, count.counts, count.record)` (slots -1 exactly where
    pos is -1), fused into the same kernel on a GPU.
    """
    if use_triton(ys, force_triton):
        from kernels.permute_triton import unpermute_triton

        return unpermute_triton(ys, pos, weights, dtype, count)
    if count is not None:
        count_slots_reference(count.slots, count.counts, count.record)
    return unpermute_reference(ys, pos, weights, dtype)


def count_slots_reference(slots: torch.Tensor, counts: torch.Tensor, record: torch.Tensor | None) -> None:
    """Torch reference of `count_slots`."""
    k = counts.shape[0]
    key = torch.where((slots >= 0) & (slots < k), slots, k).reshape(-1).long()
    per_slot = torch.zeros(k + 1, dtype=counts.dtype, device=counts.device)
    per_slot.index_add_(0, key, torch.ones(key.shape, dtype=counts.dtype, device=counts.device))
    counts.add_(per_slot[:k] if record is None else per_slot[:k] * record)


def count_slots(slots: torch.Tensor, counts: torch.Tensor, record: torch.Tensor | None = None,
                force_triton: bool = False) -> None:
    """counts[s] += (assignments of slots [R, k] to local slot s) * record, in place, with no host sync.

    slots (int32 or int64) may be a strided view (the received metadata); -1 entries and ids >= K are
    not counted. counts [K] int32;
    record (0-d int32 on the device, optional) gates the update without a recompile or graph re-capture.
    """
    if use_triton(slots, force_triton):
        from kernels.permute_triton import count_slots_triton

        count_slots_triton(slots, counts, record)
        return
    count_slots_reference(slots, counts, record)
