"""Triton grouped GEMMs for the SwiGLU experts: rows sorted by local slot, segment offsets on the device.

One kernel, launched twice. First launch: h = silu(x W_gate^T) * (x W_up^T), gathering each
assignment's row of the received buffer inside the GEMM (no permuted copy of x) and keeping both
accumulators of a tile in registers. Second launch: ys = h W_down^T on the slot-major h.
`silu_mul_triton` is SwiGLU's activation alone, for the torch._grouped_mm backend.

Work is cut into BLOCK_M-row tiles that never cross a slot boundary. A tile table built on the
device (`tile_table`) names each tile's slot and first row; it is sized for a host-known bound on
the assignments, and tiles past the real end exit at once, so no size reaches the host and empty
slots cost nothing. Programs run GROUP_M tiles across all N blocks before moving on, so the rows of
a band stay in L2 while each weight block is read once per band.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.permute import SlotGroups, use_triton


@dataclass(frozen=True)
class GemmConfig:
    """Tile sizes and launch shape of one grouped GEMM launch."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


def default_configs(rows_per_slot: int, dtype: torch.dtype) -> tuple[GemmConfig, GemmConfig]:
    """(gate_up, down): BLOCK_M near the rows a slot has (16..128); two accumulators kept in registers."""
    block_m = min(128, max(16, triton.next_power_of_2(max(rows_per_slot, 1))))
    if dtype == torch.float32:
        block_m = min(block_m, 64)
        config = GemmConfig(block_m, 32, 32, num_warps=4, num_stages=2)
        return config, config
    warps, stages = (8, 3) if block_m >= 128 else (4, 4)
    gate_up = GemmConfig(block_m, 64 if block_m >= 64 else 128, 64, num_warps=warps, num_stages=stages)
    return gate_up, GemmConfig(block_m, 128, 64, num_warps=warps, num_stages=stages)


def tile_table_reference(offsets: torch.Tensor, block_m: int,
                         tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of `tile_table` (its rows past the end are unspecified)."""
    offsets = offsets.long()
    per_slot = (offsets[1:] - offsets[:-1] + block_m - 1) // block_m
    end = per_slot.cumsum(0)
    tile = torch.arange(tiles, device=offsets.device)
    slot = torch.searchsorted(end, tile, right=True)
    s = slot.clamp(max=per_slot.shape[0] - 1)
    row = offsets[s] + (tile - end[s] + per_slot[s]) * block_m
    return slot.to(torch.int32), row.to(torch.int32)


@triton.jit
def _tile_table_kernel(offsets_ptr, slot_ptr, row_ptr, slots, tiles, block_m,
                       SP: tl.constexpr, BLOCK: tl.constexpr):
    j = tl.arange(0, SP)
    lo = tl.load(offsets_ptr + j, mask=j < slots, other=0)
    hi = tl.load(offsets_ptr + j + 1, mask=j < slots, other=0)
    per = (hi - lo + block_m - 1) // block_m  # tiles of slot j; 0 for the padding
    end = tl.cumsum(per, axis=0)
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    # a tile's slot: how many slots end at or before it (empty slots included), at most `slots`
    s = tl.minimum(tl.sum((end[None, :] <= t[:, None]).to(tl.int32), axis=1), slots)
    mine = j[None, :] == s[:, None]
    first_row = tl.sum(tl.where(mine, lo[None, :], 0), axis=1)
    first_tile = tl.sum(tl.where(mine, (end - per)[None, :], 0), axis=1)
    row = tl.where(s < slots, first_row + (t - first_tile) * block_m, 0)
    ok = t < tiles
    tl.store(slot_ptr + t, s, mask=ok)
    tl.store(row_ptr + t, row, mask=ok)


def tile_table(offsets: torch.Tensor, block_m: int, tiles: int,
               force_triton: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """For `tiles` tiles: the slot of each (K past the end) and its first row (0 past the end), int32,
    on the device: one launch on CUDA instead of the reference's ~17 small kernels."""
    if not use_triton(offsets, force_triton):
        return tile_table_reference(offsets, block_m, tiles)
    slots = offsets.shape[0] - 1
    slot = torch.empty(tiles, dtype=torch.int32, device=offsets.device)
    row = torch.empty(tiles, dtype=torch.int32, device=offsets.device)
    if tiles:
        block, padded = 16, triton.next_power_of_2(max(slots, 1))
        _tile_table_kernel[(triton.cdiv(tiles, block),)](offsets, slot, row, slots, tiles, block_m,
                                                         SP=padded, BLOCK=block)
    return slot, row


@triton.jit
def _grouped_gemm_kernel(a_ptr, stride_a, rows_ptr, b_ptr, stride_bs, stride_bn, c_ptr, stride_c,
                         tile_slot_ptr, tile_row_ptr, offsets_ptr, m_tiles, slots, up_offset,
                         N: tl.constexpr, K: tl.constexpr, GATHER: tl.constexpr, SWIGLU: tl.constexpr,
                         PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BLOCK_N)
    band = GROUP_M * n_tiles
    first = (pid // band) * GROUP_M
    size = tl.minimum(m_tiles - first, GROUP_M)
    pid_m = first + (pid % band) % size
    pid_n = (pid % band) // size

    s = tl.load(tile_slot_ptr + pid_m)
    if s < slots:
        m = tl.load(tile_row_ptr + pid_m) + tl.arange(0, BLOCK_M)
        m_ok = m < tl.load(offsets_ptr + s + 1)
        if GATHER:
            src = tl.load(rows_ptr + m, mask=m_ok, other=0).to(tl.int64)
        else:
            src = m.to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = cols < N
        kk = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + src[:, None] * stride_a + kk[None, :]
        b_ptrs = b_ptr + s.to(tl.int64) * stride_bs + cols.to(tl.int64)[:, None] * stride_bn + kk[None, :]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if K % BLOCK_K == 0:
                a_mask = m_ok[:, None]
                b_mask = n_ok[:, None]
            else:
                a_mask = m_ok[:, None] & (kk[None, :] < K - k0)
                b_mask = n_ok[:, None] & (kk[None, :] < K - k0)
            a = tl.load(a_ptrs, mask=a_mask, other=0.0)
            b = tl.load(b_ptrs, mask=b_mask, other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
            if SWIGLU:
                up = tl.load(b_ptrs + up_offset, mask=b_mask, other=0.0)
                if UPCAST:
                    up = up.to(tl.float32)
                acc_up = tl.dot(a, tl.trans(up), acc_up, input_precision=PRECISION)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        if SWIGLU:
            acc = acc * tl.sigmoid(acc) * acc_up
        out = c_ptr + m.to(tl.int64)[:, None] * stride_c + cols[None, :]
        tl.store(out, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _launch(a: torch.Tensor, rows: torch.Tensor | None, b: torch.Tensor, out: torch.Tensor,
            table: tuple[torch.Tensor, torch.Tensor], offsets: torch.Tensor, n: int, swiglu: bool,
            config: GemmConfig) -> None:
    m_tiles = table[0].shape[0]
    grid = (m_tiles * triton.cdiv(n, config.block_n),)
    _grouped_gemm_kernel[grid](
        a, a.stride(0), table[0] if rows is None else rows, b, b.stride(0), b.stride(1), out, out.stride(0),
        table[0], table[1], offsets, m_tiles, b.shape[0], n * b.stride(1),  # the up rows follow the gate rows
        N=n, K=a.shape[1], GATHER=rows is not None, SWIGLU=swiglu,
        PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        # The interpreter multiplies bf16 as raw uint16 bits (triton 3.6): give it exact fp32 copies.
        UPCAST=not a.is_cuda and a.dtype == torch.bfloat16,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
        num_warps=config.num_warps, num_stages=config.num_stages)


class TritonGateUp(NamedTuple):
    """`gate_up_triton`'s result: h = silu(gate) * up per sorted assignment, and the down launch's state."""

    h: torch.Tensor                                  # [total, I]
    table: tuple[torch.Tensor, torch.Tensor] | None  # the tile table both launches share (None: no rows)
    down: GemmConfig


def gate_up_triton(x: torch.Tensor, groups: SlotGroups, w_gate_up: torch.Tensor,
                   assignments: int | None = None,
                   configs: tuple[GemmConfig, GemmConfig] | None = None) -> TritonGateUp:
    """The first launch of `grouped_swiglu_triton`: the gate and up projections with the activation."""
    slots, inter2, _ = w_gate_up.shape
    total = groups.rows.shape[0] if assignments is None else assignments
    gate_up, down = configs or default_configs(triton.cdiv(max(total, 1), slots), x.dtype)
    h = torch.empty((total, inter2 // 2), dtype=x.dtype, device=x.device)
    if total == 0:
        return TritonGateUp(h, None, down)
    if x.stride(1) != 1:
        x = x.contiguous()
    if gate_up.block_m != down.block_m:
        raise ValueError("both launches share one tile table: block_m must match")
    table = tile_table(groups.offsets, gate_up.block_m, triton.cdiv(total, gate_up.block_m) + slots,
                       force_triton=not x.is_cuda)  # CPU tensors come here only under the interpreter
    _launch(x, groups.rows, w_gate_up.contiguous(), h, table, groups.offsets, inter2 // 2, True, gate_up)
    return TritonGateUp(h, table, down)


def down_triton(a: TritonGateUp, groups: SlotGroups, w_down: torch.Tensor) -> torch.Tensor:
    """The second launch: ys = h W_down^T, one row per sorted assignment."""
    hidden = w_down.shape[1]
    ys = torch.empty((a.h.shape[0], hidden), dtype=a.h.dtype, device=a.h.device)
    if a.table is not None:
        _launch(a.h, None, w_down.contiguous(), ys, a.table, groups.offsets, hidden, False, a.down)
    return ys


def grouped_swiglu_triton(x: torch.Tensor, groups: SlotGroups, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                          assignments: int | None = None,
                          configs: tuple[GemmConfig, GemmConfig] | None = None) -> torch.Tensor:
    """kernels.expert_ffn.grouped_swiglu with the Triton kernels; `assignments` bounds offsets[-1] (host)."""
    return down_triton(gate_up_triton(x, groups, w_gate_up, assignments, configs), groups, w_down)


@triton.jit
def _silu_mul_kernel(h_ptr, stride_h, out_ptr, stride_out, rows, used_ptr, inter,
                     HAS_USED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr):
    if HAS_USED:
        rows = tl.minimum(rows, tl.load(used_ptr))
    first = tl.program_id(0) * BLOCK_R
    if first < rows:  # programs past the rows in use exit at once
        r = first + tl.arange(0, BLOCK_R)
        c = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        ok = (r < rows)[:, None] & (c < inter)[None, :]
        row = h_ptr + r.to(tl.int64)[:, None] * stride_h + c[None, :]
        gate = tl.load(row, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(row + inter, mask=ok, other=0.0).to(tl.float32)
        out = out_ptr + r.to(tl.int64)[:, None] * stride_out + c[None, :]
        tl.store(out, (gate * tl.sigmoid(gate) * up).to(out_ptr.dtype.element_ty), mask=ok)


def silu_mul_triton(h: torch.Tensor, used: torch.Tensor | None = None) -> torch.Tensor:
    """[R, I]: silu(h[:, :I]) * h[:, I:] for h [R, 2I], computed in float32 and rounded once. One pass
    over h instead of torch's two (silu, then the product) on strided halves. `used` (a 1-element int32
    device tensor) bounds the rows computed, with no host sync; the rows past it are left unwritten."""
    rows, inter = h.shape[0], h.shape[1] // 2
    out = torch.empty((rows, inter), dtype=h.dtype, device=h.device)
    if rows == 0:
        return out
    if h.stride(1) != 1:
        h = h.contiguous()
    block_i = min(1024, triton.next_power_of_2(inter))
    block_r = max(1, 2048 // block_i)
    grid = (triton.cdiv(rows, block_r), triton.cdiv(inter, block_i))
    _silu_mul_kernel[grid](h, h.stride(0), out, out.stride(0), rows, out if used is None else used, inter,
                           HAS_USED=used is not None, BLOCK_R=block_r, BLOCK_I=block_i, num_warps=4)
    return out
