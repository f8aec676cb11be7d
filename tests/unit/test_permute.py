"""kernels.permute: the torch references against plain loops, the Triton kernels (interpreted on CPU)
against the references, and the kernels compiled for the H200.

Inputs are fresh each run (the seed is printed). The kernels run in a worker process started with
TRITON_INTERPRET=1 whose outputs are allocated poisoned (NaN / -77), so anything a kernel should
write and does not shows up.
"""

from __future__ import annotations

import pytest
import sm90
import torch
from triton_worker import interpreter_worker

from kernels import permute
from kernels.permute import drop_overflow, group_by_slot, route_rows, row_layout, unpack

DTYPES = (torch.float32, torch.bfloat16)


@pytest.fixture(scope="module")
def triton_call():
    """Call a kernels.permute function with force_triton=True in the interpreter worker (triton_worker)."""
    with interpreter_worker(("kernels.permute_triton", "_pack_kernel")) as run:

        def call(name, *args):
            """A kernels.permute function by name, or a module-level function of this file."""
            return run(_run, name, args) if isinstance(name, str) else run(name, *args)

        yield call


def _run(name: str, args: tuple):
    return getattr(permute, name)(*args, force_triton=True)


def _unpermute_counting(ys, pos, weights, dtype,
                        count: permute.SlotCount) -> tuple[torch.Tensor, torch.Tensor]:
    return permute.unpermute(ys, pos, weights, dtype, force_triton=True, count=count), count.counts


def _combine_into_range(back: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """combine into rows 2.. of a larger result (a micro-batch's token range); rows 0-1 stay untouched."""
    out = torch.full((result.shape[1] + 2, back.shape[1]), 7.0)
    got = permute.combine(back, result, force_triton=True, out=out[2:])
    assert got.data_ptr() == out[2:].data_ptr() and (out[:2] == 7.0).all()
    return got


def _combine_adding(back: torch.Tensor, result: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
    return permute.combine(back, result, force_triton=True, add=add, dtype=add.dtype)


def _count_slots(slots: torch.Tensor, counts: torch.Tensor, record: torch.Tensor | None) -> torch.Tensor:
    permute.count_slots(slots, counts, record, force_triton=True)
    return counts


# ---------------------------------------------------------------- inputs


def routing(gen: torch.Generator, tokens: int, top_k: int, world: int,
            per_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """phys [T, k] distinct slots per token, weights [T, k] on a coarse grid (equal weights happen)."""
    draws = [torch.randperm(world * per_rank, generator=gen)[:top_k] for _ in range(tokens)]
    phys = torch.stack(draws) if draws else torch.empty(0, top_k, dtype=torch.int64)
    weights = torch.randint(1, 5, (tokens, top_k), generator=gen).float() / 4
    return phys, weights


def source_side(gen: torch.Generator, tokens: int, top_k: int, world: int, per_rank: int, capacity: int,
                padded: bool, hidden: int, dtype: torch.dtype):
    phys, weights = routing(gen, tokens, top_k, world, per_rank)
    keep, _ = drop_overflow(phys, weights, capacity)
    dest = torch.where(keep, phys // per_rank, -1)
    routes = route_rows(dest, world, padded)
    rows = world * tokens if padded else int(routes.per_rank.sum())
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    return x, dest, phys % per_rank, weights, routes, rows


# ---------------------------------------------------------------- torch references against loops


@pytest.mark.parametrize("tokens, top_k, slots, capacity", [(1, 1, 3, 1), (17, 4, 6, 3), (40, 8, 10, 5),
                                                            (12, 3, 5, 12)])
def test_drop_overflow_keeps_the_heaviest_assignments_per_slot(gen, tokens, top_k, slots, capacity) -> None:
    phys, weights = routing(gen, tokens, top_k, 1, slots)
    keep, dropped = drop_overflow(phys, weights, capacity)
    want = torch.ones_like(keep)
    for s in range(slots):
        sent = sorted(((t, j) for t in range(tokens) for j in range(top_k) if phys[t, j] == s),
                      key=lambda tj: (-weights[tj].item(), tj[0]))
        for tj in sent[capacity:]:
            want[tj] = False
    assert torch.equal(keep, want)
    assert dropped.dtype == torch.int64 and dropped.item() == (~want).sum().item()


@pytest.mark.parametrize("padded", [False, True])
def test_route_rows_one_row_per_rank_with_work(gen, padded: bool) -> None:
    tokens, world = 9, 3
    dest = torch.randint(-1, world, (tokens, 4), generator=gen)
    routes = route_rows(dest, world, padded)
    rows = 0
    for w in range(world):
        for t in range(tokens):
            work = bool((dest[t] == w).any())
            want = (w * tokens + t) if padded else (rows if work else -1)
            rows += work
            assert routes.send[w, t] == want
            assert routes.result[w, t] == (want if work else -1)
        assert routes.per_rank[w] == (dest == w).any(1).sum()


@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_reference_rows_and_metadata(gen, dtype: torch.dtype) -> None:
    tokens, top_k, world, per_rank, hidden = 11, 4, 3, 4, 24
    x, dest, local, weights, routes, rows = source_side(gen, tokens, top_k, world, per_rank, 2, True, hidden,
                                                        dtype)
    buf = permute.pack(x, dest, local, weights, routes.send, rows)
    assert buf.shape == (rows, row_layout(hidden, top_k, dtype).width) and buf.dtype == dtype
    rx, slots, w = unpack(buf, hidden, top_k)
    for r in range(world):
        for t in range(tokens):
            row = routes.send[r, t]
            here = dest[t] == r
            assert torch.equal(rx[row], x[t] if here.any() else torch.zeros_like(x[t]))
            assert torch.equal(slots[row], torch.where(here, local[t], -1).int())
            assert torch.equal(w[row], torch.where(here, weights[t], 0.0))


def test_combine_reference_writes_into_out_and_refuses_a_wrong_one(gen) -> None:
    result = torch.tensor([[0, -1, 2], [1, 3, -1]], dtype=torch.int32)
    back = torch.randn(4, 8, generator=gen)
    out = torch.full((5, 8), 7.0)
    assert permute.combine(back, result, out=out[1:4]).data_ptr() == out[1:4].data_ptr()
    torch.testing.assert_close(out[1:4], permute.combine(back, result))
    assert (out[0] == 7.0).all() and (out[4] == 7.0).all()
    for bad in (torch.empty(3, 9), torch.empty(3, 8, dtype=torch.float64), torch.empty(8, 3).T):
        with pytest.raises(ValueError, match=r"out must be contiguous \[3, 8\] torch.float32"):
            permute.combine(back, result, out=bad)
    with pytest.raises(ValueError, match=r"add must be \[3, 8\]"):
        permute.combine(back, result, add=torch.zeros(3, 7))


def test_combine_adds_then_rounds_once(gen) -> None:
    """The shared experts' output is added to the float32 sum, and only the total is rounded."""
    result = torch.tensor([[0, -1, 2], [1, 3, -1]], dtype=torch.int32)
    back = torch.randn(4, 8, generator=gen).bfloat16()
    add = torch.randn(3, 8, generator=gen).bfloat16()
    got = permute.combine(back, result, add=add, dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, (permute.combine(back, result) + add.float()).bfloat16())


def test_row_layout_aligns_rows_and_metadata() -> None:
    assert row_layout(7168, 8, torch.bfloat16) == (7168 + 32, 7168 // 2)
    assert row_layout(30, 3, torch.bfloat16) == (32 + 16, 16)
    assert row_layout(30, 3, torch.float32) == (32 + 8, 32)


def test_combine_group_and_unpermute_references_against_loops(gen) -> None:
    world, tokens, hidden, per_rank, top_k = 3, 5, 8, 4, 3
    result = torch.randint(-1, 7, (world, tokens), generator=gen).int()
    back = torch.randn(7, hidden, generator=gen)
    got = permute.combine(back, result)
    for t in range(tokens):
        want = sum((back[r] for r in result[:, t].tolist() if r >= 0), torch.zeros(hidden))
        torch.testing.assert_close(got[t], want)

    slots = torch.randint(-1, per_rank, (6, top_k), generator=gen).int()
    groups = group_by_slot(slots, per_rank)
    flat = [(s, i) for i, s in enumerate(slots.reshape(-1).tolist()) if s >= 0]
    in_order = sorted(flat)  # by slot, then position: stable
    assert groups.rows[:len(in_order)].tolist() == [i // top_k for _, i in in_order]
    sizes = [sum(1 for s, _ in flat if s == slot) for slot in range(per_rank)]
    assert groups.offsets.tolist() == [sum(sizes[:s]) for s in range(per_rank + 1)]
    for p, (_, i) in enumerate(in_order):
        assert groups.pos.reshape(-1)[i] == p
    assert (groups.pos.reshape(-1)[slots.reshape(-1) < 0] == -1).all()

    ys = torch.randn(slots.numel(), hidden, generator=gen)
    weights = torch.rand(slots.shape, generator=gen)
    got = permute.unpermute(ys, groups.pos, weights, torch.float32)
    for r in range(slots.shape[0]):
        want = sum((weights[r, j] * ys[groups.pos[r, j]] for j in range(top_k) if slots[r, j] >= 0),
                   torch.zeros(hidden))
        torch.testing.assert_close(got[r], want)


# ---------------------------------------------------------------- Triton kernels against the references

SHAPES = [  # tokens, top_k, world, slots a rank, capacity, hidden
    (1, 1, 1, 3, 1, 32),
    (1, 4, 4, 2, 1, 40),
    (13, 3, 3, 5, 2, 72),
    (16, 8, 4, 6, 16, 64),
    (0, 2, 2, 3, 0, 32),
]


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_pack_and_combine_kernels_match_references(gen, triton_call, shape, dtype: torch.dtype,
                                                   padded: bool) -> None:
    tokens, top_k, world, per_rank, capacity, hidden = shape
    x, dest, local, weights, routes, rows = source_side(gen, tokens, top_k, world, per_rank, capacity, padded,
                                                        hidden, dtype)
    want = unpack(permute.pack(x, dest, local, weights, routes.send, rows), hidden, top_k)
    got = unpack(triton_call("pack", x, dest, local, weights, routes.send, rows), hidden, top_k)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)

    back = torch.randn(rows, hidden, generator=gen).to(dtype)
    want = permute.combine(back, routes.result)
    torch.testing.assert_close(triton_call("combine", back, routes.result), want, rtol=1e-6, atol=1e-6)
    into_range = triton_call(_combine_into_range, back, routes.result)
    torch.testing.assert_close(into_range, want, rtol=1e-6, atol=1e-6)
    add = torch.randn(tokens, hidden, generator=gen).to(dtype)
    want = permute.combine(back, routes.result, add=add, dtype=dtype)
    got = triton_call(_combine_adding, back, routes.result, add)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, **({} if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-6)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, top_k, per_rank, hidden", [(1, 1, 1, 32), (1, 4, 3, 40), (7, 3, 5, 72),
                                                           (24, 8, 6, 64)])
def test_gather_and_unpermute_kernels_match_references(gen, triton_call, rows, top_k, per_rank, hidden,
                                                       dtype: torch.dtype) -> None:
    width = row_layout(hidden, top_k, dtype).width
    received = torch.randn(rows, width, generator=gen).to(dtype)  # a strided x, as unpack gives
    x = received[:, :hidden]
    slots = torch.randint(-1, per_rank, (rows, top_k), generator=gen).int()
    if per_rank > 2:
        slots[slots == 1] = -1  # an empty segment
    groups = group_by_slot(slots, per_rank)
    used = int(groups.offsets[-1])
    want = permute.gather_rows(x, groups)[:used]
    got = triton_call("gather_rows", x, groups)
    assert got.shape == (rows * top_k, hidden)
    assert torch.equal(got[:used], want)
    assert torch.equal(triton_call("gather_rows", x, groups, used), want)

    ys = torch.randn(rows * top_k, hidden, generator=gen).to(dtype)
    weights = torch.rand(rows, 2 * top_k, generator=gen)[:, top_k:]  # strided, as the received metadata
    got = triton_call("unpermute", ys, groups.pos, weights, dtype)
    want = permute.unpermute(ys, groups.pos, weights, dtype)
    tol = {} if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)  # one bf16 rounding of the sum
    torch.testing.assert_close(got, want, **tol)

    # telemetry fused in: the received metadata's slots (a strided view) counted into a live counter
    start = torch.randint(0, 9, (per_rank,), generator=gen).int()
    for flag in (None, torch.tensor(1, dtype=torch.int32), torch.tensor(0, dtype=torch.int32)):
        added = 0 if flag is not None and int(flag) == 0 else torch.bincount(
            slots[slots >= 0].long(), minlength=per_rank).int()
        ref_counts = start.clone()
        reference = permute.unpermute(ys, groups.pos, weights, dtype,
                                      count=permute.SlotCount(slots, ref_counts, flag))
        got, got_counts = triton_call(_unpermute_counting, ys, groups.pos, weights, dtype,
                                      permute.SlotCount(slots, start.clone(), flag))
        torch.testing.assert_close(got, want, **tol)
        assert torch.equal(reference, want)
        assert torch.equal(ref_counts, start + added) and torch.equal(got_counts, start + added)


@pytest.mark.parametrize("record", [None, 1, 0])
@pytest.mark.parametrize("rows, top_k, per_rank", [(1, 1, 1), (1, 8, 5), (13, 3, 7), (300, 8, 130),
                                                   (700, 4, 257)])
def test_count_slots_kernel_adds_exact_counts(gen, triton_call, rows, top_k, per_rank, record) -> None:
    """Counts added into a non-zero counter, from a strided view of the received metadata."""
    received = torch.randint(-1, per_rank, (rows, 2 * top_k + 3), generator=gen).int()
    slots = received[:, 2:2 + top_k]
    flag = None if record is None else torch.tensor(record, dtype=torch.int32)
    start = torch.randint(0, 9, (per_rank,), generator=gen).int()
    want = start + (0 if record == 0 else torch.bincount(slots[slots >= 0].long(), minlength=per_rank).int())
    reference = start.clone()
    permute.count_slots(slots, reference, flag)
    assert torch.equal(reference, want)
    assert torch.equal(triton_call(_count_slots, slots, start.clone(), flag), want)
    physical = slots.long().contiguous()  # dispatch counts the physical slots [T, k] int64 it sends
    assert torch.equal(triton_call(_count_slots, physical, start.clone(), flag), want)


# ---------------------------------------------------------------- compiled for the H200 (no GPU needed)


@pytest.mark.skipif(not sm90.AVAILABLE, reason="triton without its CUDA backend")
def test_kernels_compile_for_h200_with_vector_copies() -> None:
    """DeepSeek-V3 shapes (hidden 7168 bf16, top-8, 4 ranks): every row copy moves 16 bytes a lane."""
    from kernels import permute_triton as pt

    cases = [  # kernel, pointers that are not int32, constexprs, int arguments divisible by 16
        (pt._pack_kernel, {"x_ptr": "*bf16", "buf_ptr": "*bf16", "weights_ptr": "*fp32"},
         dict(K=8, KP=8, WP=4, BLOCK_H=1024), ["stride_x", "hidden", "width", "words", "meta"]),
        (pt._combine_kernel, {"back_ptr": "*bf16", "add_ptr": "*bf16", "out_ptr": "*bf16"},
         dict(ADD=True, WP=4, BLOCK_H=1024), ["stride_b", "stride_a", "hidden"]),
        (pt._gather_kernel, {"x_ptr": "*bf16", "out_ptr": "*bf16"}, dict(BLOCK_M=4, BLOCK_H=1024),
         ["stride_x", "hidden"]),
        (pt._unpermute_kernel, {"ys_ptr": "*bf16", "weights_ptr": "*fp32", "out_ptr": "*bf16"},
         dict(K=8, KP=8, BLOCK_R=4, BLOCK_H=1024, COUNT=True, BINS=256, HAS_RECORD=True),
         ["stride_y", "hidden"]),
    ]
    for fn, typed, constexprs, aligned_ints in cases:
        args = [a for a in fn.arg_names if a not in constexprs]
        pointers = [a for a in args if a.endswith("_ptr")]
        signature = {a: typed.get(a, "*i32" if a in pointers else "i32") for a in args}
        kernel, _ = sm90.compile_sm90(fn, signature, constexprs, pointers + aligned_ints, num_warps=4)
        ptx = kernel.asm["ptx"]
        assert "ld.global.v4" in ptx and "st.global.v4" in ptx, fn.__name__


@pytest.mark.skipif(not sm90.AVAILABLE, reason="triton without its CUDA backend")
def test_count_slots_kernel_compiles_for_h200() -> None:
    from kernels import permute_triton as pt

    constexprs = dict(K=8, KP=8, BLOCK_R=pt.COUNT_BLOCK // 8, BINS=256, HAS_RECORD=True)
    args = [a for a in pt._count_slots_kernel.arg_names if a not in constexprs]
    pointers = [a for a in args if a.endswith("_ptr")]
    signature = {a: "*i32" if a in pointers else "i32" for a in args}
    kernel, _ = sm90.compile_sm90(pt._count_slots_kernel, signature, constexprs, pointers, num_warps=4)
    assert "atom.global" in kernel.asm["ptx"] or "red.global" in kernel.asm["ptx"]
