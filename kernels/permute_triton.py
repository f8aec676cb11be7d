"""Triton kernels behind kernels/permute.py: pack, combine, gather_rows, unpermute and count_slots.

All four move rows of the hidden size by index, one [rows, BLOCK_H] tile a program, and never sync
with the host. pack and combine take one token a program and all W ranks at once (x is read once
and written up to W times; the W returned rows are summed in registers). gather_rows and unpermute
read their assignment count and indices on the device. count_slots is a per-program histogram and one
atomic per non-empty slot per program. Shapes and dtypes are checked by the callers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.permute import SlotCount, row_layout

TILE = 4096  # elements per program tile: rows x BLOCK_H


def _block_h(hidden: int, rows: int) -> int:
    return min(triton.next_power_of_2(hidden), max(64, TILE // rows))


@triton.jit
def _pack_kernel(x_ptr, stride_x, dest_ptr, local_ptr, weights_ptr, send_ptr, buf_ptr, words_ptr,
                 tokens, hidden, width, words, meta, world,
                 K: tl.constexpr, KP: tl.constexpr, WP: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0)
    hb = tl.program_id(1)
    rank = tl.arange(0, WP)
    row = tl.load(send_ptr + rank * tokens + t, mask=rank < world, other=-1).to(tl.int64)
    j = tl.arange(0, KP)
    j_ok = j < K
    dest = tl.load(dest_ptr + t * K + j, mask=j_ok, other=-1)
    here = (dest[None, :] == rank[:, None]) & j_ok[None, :]  # [WP, KP]
    has = tl.max(here.to(tl.int32), axis=1) > 0
    written = row >= 0

    col = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = col < hidden
    x = tl.load(x_ptr + t.to(tl.int64) * stride_x + col, mask=col_ok, other=0.0)
    values = tl.where(has[:, None], x[None, :], tl.zeros_like(x)[None, :])
    tl.store(buf_ptr + row[:, None] * width + col[None, :], values, mask=written[:, None] & col_ok[None, :])

    if hb == 0:
        local = tl.load(local_ptr + t * K + j, mask=j_ok, other=-1)
        weight = tl.load(weights_ptr + t * K + j, mask=j_ok, other=0.0)
        slots = tl.where(here, local[None, :], -1)
        wts = tl.where(here, weight[None, :], 0.0)
        at = words_ptr + row[:, None] * words + meta + j[None, :]
        ok = written[:, None] & j_ok[None, :]
        tl.store(at, slots, mask=ok)
        tl.store(at + K, wts.to(tl.int32, bitcast=True), mask=ok)


def pack_triton(x: torch.Tensor, dest: torch.Tensor, local: torch.Tensor, weights: torch.Tensor,
                send: torch.Tensor, rows: int) -> torch.Tensor:
    """kernels.permute.pack in one launch; padding bytes are left unwritten."""
    world, tokens = send.shape
    hidden, k = x.shape[1], dest.shape[1]
    layout = row_layout(hidden, k, x.dtype)
    buf = torch.empty((rows, layout.width), dtype=x.dtype, device=x.device)
    if tokens == 0 or rows == 0:
        return buf
    if x.stride(1) != 1:
        x = x.contiguous()
    wp = triton.next_power_of_2(world)
    block_h = _block_h(hidden, wp)
    _pack_kernel[(tokens, triton.cdiv(hidden, block_h))](
        x, x.stride(0), dest.to(torch.int32).contiguous(), local.to(torch.int32).contiguous(),
        weights.float().contiguous(), send.to(torch.int32).contiguous(), buf, buf.view(torch.int32),
        tokens, hidden, layout.width, layout.width * x.element_size() // 4, layout.meta, world,
        K=k, KP=triton.next_power_of_2(k), WP=wp, BLOCK_H=block_h, num_warps=4)
    return buf


@triton.jit
def _combine_kernel(back_ptr, stride_b, result_ptr, add_ptr, stride_a, out_ptr, tokens, hidden, world,
                    ADD: tl.constexpr, WP: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0)
    col = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = col < hidden
    rank = tl.arange(0, WP)
    row = tl.load(result_ptr + rank * tokens + t, mask=rank < world, other=-1).to(tl.int64)
    values = tl.load(back_ptr + row[:, None] * stride_b + col[None, :],
                     mask=(row >= 0)[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    total = tl.sum(values, axis=0)
    if ADD:
        total += tl.load(add_ptr + t.to(tl.int64) * stride_a + col, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t.to(tl.int64) * hidden + col, total.to(out_ptr.dtype.element_ty), mask=col_ok)


def combine_triton(back: torch.Tensor, result: torch.Tensor, out: torch.Tensor,
                   add: torch.Tensor | None = None) -> torch.Tensor:
    """kernels.permute.combine in one launch, into `out` (contiguous [T, H]), plus `add` when given."""
    world, tokens = result.shape
    hidden = back.shape[1]
    if tokens == 0:
        return out
    if back.stride(1) != 1:
        back = back.contiguous()
    if add is not None and add.stride(1) != 1:
        add = add.contiguous()
    wp = triton.next_power_of_2(world)
    block_h = _block_h(hidden, wp)
    _combine_kernel[(tokens, triton.cdiv(hidden, block_h))](
        back, back.stride(0), result.to(torch.int32).contiguous(), out if add is None else add,
        0 if add is None else add.stride(0), out, tokens, hidden, world,
        ADD=add is not None, WP=wp, BLOCK_H=block_h, num_warps=4)
    return out


@triton.jit
def _gather_kernel(x_ptr, stride_x, rows_ptr, offsets_ptr, out_ptr, slots, hidden,
                   BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    m_ok = m < tl.load(offsets_ptr + slots)
    col_ok = col < hidden
    src = tl.load(rows_ptr + m, mask=m_ok, other=0).to(tl.int64)
    ok = m_ok[:, None] & col_ok[None, :]
    values = tl.load(x_ptr + src[:, None] * stride_x + col[None, :], mask=ok)
    tl.store(out_ptr + m.to(tl.int64)[:, None] * hidden + col[None, :], values, mask=ok)


def gather_rows_triton(x: torch.Tensor, rows: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """kernels.permute.gather_rows in one launch over len(rows) rows (the true count stays on the device)."""
    total, hidden = rows.shape[0], x.shape[1]
    out = torch.empty((total, hidden), dtype=x.dtype, device=x.device)
    if total == 0:
        return out
    if x.stride(1) != 1:
        x = x.contiguous()
    block_m = 4
    block_h = _block_h(hidden, block_m)
    _gather_kernel[(triton.cdiv(total, block_m), triton.cdiv(hidden, block_h))](
        x, x.stride(0), rows, offsets, out, offsets.shape[0] - 1, hidden,
        BLOCK_M=block_m, BLOCK_H=block_h, num_warps=4)
    return out


@triton.jit
def _unpermute_kernel(ys_ptr, stride_y, pos_ptr, weights_ptr, stride_w, out_ptr, rows, hidden,
                      slots_ptr, stride_s, counts_ptr, record_ptr, slots_here,
                      K: tl.constexpr, KP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
                      COUNT: tl.constexpr, BINS: tl.constexpr, HAS_RECORD: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    col = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    r_ok = r < rows
    col_ok = col < hidden
    acc = tl.zeros([BLOCK_R, BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(K):
        p = tl.load(pos_ptr + r * K + j, mask=r_ok, other=-1)
        used = p >= 0
        w = tl.load(weights_ptr + r.to(tl.int64) * stride_w + j, mask=used, other=0.0)
        y = tl.load(ys_ptr + p.to(tl.int64)[:, None] * stride_y + col[None, :],
                    mask=used[:, None] & col_ok[None, :], other=0.0)
        acc += w[:, None] * y.to(tl.float32)
    out = out_ptr + r.to(tl.int64)[:, None] * hidden + col[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=r_ok[:, None] & col_ok[None, :])
    if COUNT:
        if tl.program_id(1) == 0:
            _count_block(slots_ptr, stride_s, counts_ptr, record_ptr, tl.program_id(0) * BLOCK_R, rows,
                         slots_here, K, KP, BLOCK_R, BINS, HAS_RECORD)


def unpermute_triton(ys: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype,
                     count: SlotCount | None = None) -> torch.Tensor:
    """kernels.permute.unpermute in one launch; weights may be a strided view (the received metadata)."""
    rows, k = pos.shape
    hidden = ys.shape[1]
    out = torch.empty((rows, hidden), dtype=dtype, device=ys.device)
    if rows == 0:
        return out
    if ys.stride(1) != 1:
        ys = ys.contiguous()
    if weights.stride(1) != 1:
        weights = weights.contiguous()
    block_r = 4
    block_h = _block_h(hidden, block_r)
    slots = counts = record = pos  # stand-ins the kernel never reads without COUNT
    if count is not None:
        slots = count.slots if count.slots.stride(1) == 1 else count.slots.contiguous()
        counts = count.counts
        record = counts if count.record is None else count.record
    _unpermute_kernel[(triton.cdiv(rows, block_r), triton.cdiv(hidden, block_h))](
        ys, ys.stride(0), pos.to(torch.int32).contiguous(), weights, weights.stride(0), out, rows, hidden,
        slots, slots.stride(0), counts, record, counts.shape[0],
        K=k, KP=triton.next_power_of_2(k), BLOCK_R=block_r, BLOCK_H=block_h, COUNT=count is not None,
        BINS=triton.next_power_of_2(counts.shape[0]),
        HAS_RECORD=count is not None and count.record is not None,
        num_warps=4)
    return out


@triton.jit
def _count_block(slots_ptr, stride_s, counts_ptr, record_ptr, row0, rows, slots_here,
                 K: tl.constexpr, KP: tl.constexpr, BLOCK_R: tl.constexpr, BINS: tl.constexpr,
                 HAS_RECORD: tl.constexpr):
    """counts += histogram of the slot ids in rows [row0, row0 + BLOCK_R) of the [rows, K] slots."""
    r = row0 + tl.arange(0, BLOCK_R)
    j = tl.arange(0, KP)
    ok = (r < rows)[:, None] & (j < K)[None, :]
    slot = tl.load(slots_ptr + r.to(tl.int64)[:, None] * stride_s + j[None, :], mask=ok, other=-1)
    slot = slot.to(tl.int32)  # int64 physical slots from dispatch
    used = ok & (slot >= 0) & (slot < slots_here)
    hist = tl.histogram(tl.reshape(tl.where(used, slot, 0), [BLOCK_R * KP]), BINS,
                        mask=tl.reshape(used, [BLOCK_R * KP]))
    if HAS_RECORD:
        hist = hist * tl.load(record_ptr)
    b = tl.arange(0, BINS)
    tl.atomic_add(counts_ptr + b, hist, mask=(b < slots_here) & (hist != 0), sem="relaxed")


@triton.jit
def _count_slots_kernel(slots_ptr, stride_s, counts_ptr, record_ptr, rows, slots_here,
                        K: tl.constexpr, KP: tl.constexpr, BLOCK_R: tl.constexpr, BINS: tl.constexpr,
                        HAS_RECORD: tl.constexpr):
    _count_block(slots_ptr, stride_s, counts_ptr, record_ptr, tl.program_id(0) * BLOCK_R, rows, slots_here,
                 K, KP, BLOCK_R, BINS, HAS_RECORD)


COUNT_BLOCK = 2048  # entries a program: one program up to 256 tokens x top-8


def count_slots_triton(slots: torch.Tensor, counts: torch.Tensor, record: torch.Tensor | None) -> None:
    """kernels.permute.count_slots in one launch."""
    rows, k = slots.shape
    if rows == 0:
        return
    if slots.stride(1) != 1:
        slots = slots.contiguous()
    kp = triton.next_power_of_2(k)
    block_r = max(1, COUNT_BLOCK // kp)
    _count_slots_kernel[(triton.cdiv(rows, block_r),)](
        slots, slots.stride(0), counts, counts if record is None else record, rows, counts.shape[0],
        K=k, KP=kp, BLOCK_R=block_r, BINS=triton.next_power_of_2(counts.shape[0]),
        HAS_RECORD=record is not None, num_warps=4)
