"""Fused routing kernel: logits -> scores -> (grouped) top-k -> weights -> per-expert counts.

A program routes blocks of BLOCK_T tokens (a grid-stride loop over blocks once there are more than
PROGRAMS_PER_SM programs a multiprocessor) with a whole row of experts in registers: a
[BLOCK_T, GP * GSP] tile (groups and group size each padded to a power of two and masked), viewed
as [BLOCK_T, GP, GSP] for the group stage. Every selection step is a max over packed int64 keys,
(order-preserving bits of the score) << 32 | (2^31 - 1 - expert), so one reduction yields both the
largest score and, among equal scores, the lowest expert index: exactly torch's stable descending
order. A chosen key is overwritten with MIN_KEY. Per-expert counts come from a second pass over the
ids the program stored (a histogram per block, one atomic per expert per program), so the routing
loop carries no tally in registers. Design notes: docs/kernels.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.route import RouteOutput, RoutingSpec, validate_route_inputs

MIN_KEY = tl.constexpr(-(2**63))  # padding and already-chosen experts
DROPPED_KEY = tl.constexpr(-(2**63) + 1)  # experts of groups that were not kept
LOW_BITS = tl.constexpr(2**31 - 1)


@dataclass(frozen=True)
class LaunchConfig:
    """Tokens per block, warps per program, and at most `programs` programs (None: PROGRAMS_PER_SM a
    streaming multiprocessor), each looping over blocks."""

    block_t: int
    num_warps: int
    programs: int | None = None

    def __post_init__(self) -> None:
        if self.block_t < 1 or self.block_t & (self.block_t - 1):
            raise ValueError(f"block_t must be a power of two >= 1, got {self.block_t}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be one of 1, 2, 4, 8, 16, got {self.num_warps}")
        if self.programs is not None and self.programs < 1:
            raise ValueError(f"programs must be >= 1, got {self.programs}")


# Programs a streaming multiprocessor (2112 on an H200): only about 3 are resident at a time (164
# registers a thread), the rest start as others finish, which hides each program's tail (its count
# pass and atomics) better than a longer loop; measured best from 4096 to 65536 tokens
# (`benchmarks/kernels.py --sweep programs`), and it bounds the atomics of very large batches.
PROGRAMS_PER_SM = 16


def default_launch(tokens: int, spec: RoutingSpec) -> LaunchConfig:
    """Spread small batches over about 128 programs with 8 scores a lane (latency: DeepSeek-V3 at 256
    tokens 6.3 -> 4.5 us against 16 a lane); large ones take at most 2048 scores a block and 16 scores
    a lane (the fewest instructions a row in ahead-of-time sm_90 builds)."""
    row = triton.next_power_of_2(spec.groups) * triton.next_power_of_2(spec.group_size)
    largest = max(1, 2048 // row)
    block_t = min(largest, triton.next_power_of_2(triton.cdiv(max(tokens, 1), 128)))
    scores_a_lane = 16 if block_t == largest else 8
    return LaunchConfig(block_t, min(8, max(1, block_t * row // (32 * scores_a_lane))))


def _program_cap(device: torch.device) -> int:
    if device.type != "cuda":
        return 1 << 30  # the interpreter: one block a program unless the launch says otherwise
    return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def _pack(score, index):
    """Keys whose signed order is (score ascending, index descending)."""
    bits = score.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & LOW_BITS)
    return (ordered.to(tl.int64) << 32) | (index ^ LOW_BITS).to(tl.int64)  # low bits: 2^31 - 1 - index


@triton.jit
def _unpack_score(key):
    ordered = (key >> 32).to(tl.int32)
    return (ordered ^ ((ordered >> 31) & LOW_BITS)).to(tl.float32, bitcast=True)


@triton.jit
def _unpack_index(key):
    return ((key & LOW_BITS) ^ LOW_BITS).to(tl.int32)


@triton.jit
def _keep_best_groups(key, GROUPS: tl.constexpr, TOPK_GROUPS: tl.constexpr, GP: tl.constexpr,
                      GSP: tl.constexpr, BLOCK_T: tl.constexpr):
    """Drop every expert outside the TOPK_GROUPS groups with the largest top-2 score sums."""
    grouped = tl.reshape(key, [BLOCK_T, GP, GSP])
    top1 = tl.max(grouped, axis=2)
    top2 = tl.max(tl.where(grouped == top1[:, :, None], MIN_KEY, grouped), axis=2)
    group = tl.arange(0, GP)
    gkey = _pack(_unpack_score(top1) + _unpack_score(top2), group[None, :])
    gkey = tl.where(group[None, :] < GROUPS, gkey, MIN_KEY)
    keep = tl.zeros_like(gkey) != 0
    for _ in tl.static_range(TOPK_GROUPS):
        hit = gkey == tl.max(gkey, axis=1)[:, None]
        keep = keep | hit
        gkey = tl.where(hit, MIN_KEY, gkey)
    keep = tl.reshape(tl.broadcast_to(keep[:, :, None], [BLOCK_T, GP, GSP]), [BLOCK_T, GP * GSP])
    return tl.where(keep, key, DROPPED_KEY)


@triton.jit
def _select(sel, expert, valid, GROUPS: tl.constexpr, TOPK_GROUPS: tl.constexpr, GP: tl.constexpr,
            GSP: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, BLOCK_T: tl.constexpr):
    """Top-K of each row: ids [BLOCK_T, KP] (descending) and the keys with the chosen ones at MIN_KEY."""
    key = tl.where(valid[None, :], _pack(sel, expert[None, :]), MIN_KEY)
    if GROUPS > 1:
        key = _keep_best_groups(key, GROUPS, TOPK_GROUPS, GP, GSP, BLOCK_T)
    slot = tl.arange(0, KP)
    ids = tl.zeros([BLOCK_T, KP], dtype=tl.int32)
    for i in tl.static_range(K):
        best = tl.max(key, axis=1)
        key = tl.where(key == best[:, None], MIN_KEY, key)
        ids = tl.where(slot[None, :] == i, _unpack_index(best)[:, None], ids)
    return ids, key


@triton.jit
def _route_kernel(logits_ptr, stride_t, cbias_ptr, sbias_ptr, counts_ptr, record_ptr,
                  ids_ptr, weights_ptr, changed_ptr, tokens, blocks, programs, scale,
                  GROUPS: tl.constexpr, GROUP_SIZE: tl.constexpr, TOPK_GROUPS: tl.constexpr,
                  K: tl.constexpr, BLOCK_T: tl.constexpr, GP: tl.constexpr, GSP: tl.constexpr,
                  KP: tl.constexpr, SOFTMAX: tl.constexpr, RENORMALIZE: tl.constexpr,
                  HAS_CBIAS: tl.constexpr, HAS_SBIAS: tl.constexpr, COUNT: tl.constexpr,
                  HAS_RECORD: tl.constexpr, ACCUMULATE_CHANGED: tl.constexpr):
    pid = tl.program_id(0)
    # column c holds member c % GSP of group c // GSP; the padding columns are masked
    col = tl.arange(0, GP * GSP)
    expert = (col // GSP) * GROUP_SIZE + col % GSP
    valid = (col % GSP < GROUP_SIZE) & (col // GSP < GROUPS)
    slot = tl.arange(0, KP)
    changed = tl.full([], 0, tl.int64)
    block = pid
    while block < blocks:  # a while loop: the interpreter cannot take a run-time range bound
        rows = block * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < tokens
        row_base = logits_ptr + rows.to(tl.int64) * stride_t
        x = tl.load(row_base[:, None] + expert[None, :], mask=row_ok[:, None] & valid[None, :],
                    other=0.0).to(tl.float32)
        if SOFTMAX:
            x = tl.where(valid[None, :], x, float("-inf"))
            row_max = tl.max(x, axis=1)
            exps = tl.exp(x - row_max[:, None])
            row_sum = tl.sum(exps, axis=1)
            score = exps / row_sum[:, None]
        else:
            score = tl.sigmoid(x)
        sel = score
        if HAS_CBIAS:
            sel = sel + tl.load(cbias_ptr + expert, mask=valid, other=0.0)[None, :]
        biased = sel
        if HAS_SBIAS:
            biased = sel + tl.load(sbias_ptr + expert, mask=valid, other=0.0)[None, :]

        ids, key = _select(biased, expert, valid, GROUPS, TOPK_GROUPS, GP, GSP, K, KP, BLOCK_T)
        if HAS_SBIAS:
            chosen = (key == MIN_KEY) & valid[None, :] & row_ok[:, None]
            _, unbiased_key = _select(sel, expert, valid, GROUPS, TOPK_GROUPS, GP, GSP, K, KP, BLOCK_T)
            moved = chosen & (unbiased_key != MIN_KEY)
            changed += tl.sum(tl.sum(moved.to(tl.int64), axis=1), axis=0)

        out_mask = row_ok[:, None] & (slot[None, :] < K)
        picked = tl.load(row_base[:, None] + ids, mask=out_mask, other=0.0).to(tl.float32)
        if SOFTMAX:
            weights = tl.exp(picked - row_max[:, None]) / row_sum[:, None]
        else:
            weights = tl.sigmoid(picked)
        weights = tl.where(slot[None, :] < K, weights, 0.0)
        if RENORMALIZE:
            weights = weights / tl.sum(weights, axis=1)[:, None]
        out = rows.to(tl.int64)[:, None] * K + slot[None, :]
        tl.store(ids_ptr + out, ids.to(tl.int64), mask=out_mask)
        tl.store(weights_ptr + out, weights * scale, mask=out_mask)
        block += programs

    if ACCUMULATE_CHANGED:
        tl.atomic_add(changed_ptr, changed, sem="relaxed")
    else:
        tl.store(changed_ptr, changed, mask=pid == 0)
    if COUNT:
        # A second pass over the ids this program stored (in L2): the routing loop keeps no tally
        # alive, which would cost it registers and occupancy.
        tl.debug_barrier()
        bins = tl.arange(0, GP * GSP)
        hist = tl.zeros([GP * GSP], dtype=tl.int32)
        block = pid
        while block < blocks:
            rows = block * BLOCK_T + tl.arange(0, BLOCK_T)
            out_mask = (rows < tokens)[:, None] & (slot[None, :] < K)
            got = tl.load(ids_ptr + rows.to(tl.int64)[:, None] * K + slot[None, :], mask=out_mask, other=0)
            hist += tl.histogram(tl.reshape(got.to(tl.int32), [BLOCK_T * KP]), GP * GSP,
                                 mask=tl.reshape(out_mask, [BLOCK_T * KP]))
            block += programs
        if HAS_RECORD:
            hist = hist * tl.load(record_ptr)
        tl.atomic_add(counts_ptr + bins, hist, mask=(bins < GROUPS * GROUP_SIZE) & (hist != 0), sem="relaxed")


def kernel_constants(spec: RoutingSpec, launch: LaunchConfig, *, correction: bool, selection: bool,
                     count: bool, record: bool, accumulate: bool) -> dict[str, int | bool]:
    """The compile-time arguments of `_route_kernel` for one call shape."""
    return {
        "GROUPS": spec.groups, "GROUP_SIZE": spec.group_size, "TOPK_GROUPS": spec.topk_groups,
        "K": spec.top_k, "BLOCK_T": launch.block_t, "GP": triton.next_power_of_2(spec.groups),
        "GSP": triton.next_power_of_2(spec.group_size), "KP": triton.next_power_of_2(spec.top_k),
        "SOFTMAX": spec.kind == "softmax", "RENORMALIZE": spec.renormalize, "HAS_CBIAS": correction,
        "HAS_SBIAS": selection, "COUNT": count, "HAS_RECORD": record, "ACCUMULATE_CHANGED": accumulate,
    }


def route_triton(logits: torch.Tensor, spec: RoutingSpec, *, correction_bias: torch.Tensor | None = None,
                 selection_bias: torch.Tensor | None = None, counts: torch.Tensor | None = None,
                 record: torch.Tensor | None = None, launch: LaunchConfig | None = None) -> RouteOutput:
    """The Triton kernel behind `kernels.route.route`; same contract, one launch, no host sync.

    `changed` needs a zero-filled buffer (one extra fill) only when a selection bias is given
    and more than one program runs.
    """
    validate_route_inputs(logits, spec, correction_bias, selection_bias, counts, record)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    tokens = logits.shape[0]
    launch = launch or default_launch(tokens, spec)
    device = logits.device
    blocks = triton.cdiv(tokens, launch.block_t)
    programs = min(blocks, launch.programs or _program_cap(device))
    ids = torch.empty((tokens, spec.top_k), dtype=torch.int64, device=device)
    weights = torch.empty((tokens, spec.top_k), dtype=torch.float32, device=device)
    accumulate = selection_bias is not None and programs > 1
    if accumulate or programs == 0:
        changed = torch.zeros((), dtype=torch.int64, device=device)
    else:
        changed = torch.empty((), dtype=torch.int64, device=device)
    if programs == 0:
        return RouteOutput(ids, weights, changed)
    unused = weights  # stands in for absent optional tensors; the kernel never touches it
    _route_kernel[(programs,)](
        logits, logits.stride(0),
        unused if correction_bias is None else correction_bias,
        unused if selection_bias is None else selection_bias,
        unused if counts is None else counts,
        unused if record is None else record,
        ids, weights, changed, tokens, blocks, programs, float(spec.scale),
        **kernel_constants(spec, launch, correction=correction_bias is not None,
                           selection=selection_bias is not None, count=counts is not None,
                           record=record is not None, accumulate=accumulate),
        num_warps=launch.num_warps,
    )
    return RouteOutput(ids, weights, changed)
