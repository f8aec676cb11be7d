"""kernels.expert_ffn and run_experts: the grouped Triton SwiGLU (interpreted on CPU) and torch._grouped_mm
against the per-slot torch loop, the backend choice, and the GEMM configs compiled for the H200.

Inputs are fresh each run (the seed is printed). The Triton kernels run in a worker process started
with TRITON_INTERPRET=1 whose outputs are allocated poisoned (NaN), so unwritten rows show.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import sm90
import torch
from triton_worker import interpreter_worker

from kernels import expert_ffn
from kernels.expert_ffn import BACKEND_ENV, grouped_swiglu, grouped_swiglu_reference, select_backend
from kernels.permute import group_by_slot
from moe_runtime.experts import run_experts, run_experts_loop

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.fixture(scope="module")
def interpreted():
    """Run a function of this module in the interpreter worker (triton_worker)."""
    with interpreter_worker(("kernels.expert_ffn_triton", "_grouped_gemm_kernel"),
                            ("kernels.expert_ffn_triton", "_silu_mul_kernel"),
                            ("kernels.expert_ffn_triton", "_tile_table_kernel"),
                            ("kernels.permute_triton", "_unpermute_kernel")) as call:
        yield call


def _triton_ys(x, groups, w_gate_up, w_down, assignments, configs):
    from kernels.expert_ffn_triton import GemmConfig, grouped_swiglu_triton

    configs = None if configs is None else tuple(GemmConfig(*c) for c in configs)
    return grouped_swiglu_triton(x, groups, w_gate_up, w_down, assignments, configs)


def _run_experts(*args, **kwargs):
    return run_experts(*args, **kwargs)


def _silu_mul(h, used=None):
    from kernels.expert_ffn_triton import silu_mul_triton

    return silu_mul_triton(h, used)


def _run_experts_counting(*args, **kwargs):
    out = run_experts(*args, **kwargs)
    return out, kwargs["count"][0]


def _received(slots: torch.Tensor, per_rank: int) -> torch.Tensor:
    return torch.bincount(slots[slots >= 0].long(), minlength=per_rank).int()


# ---------------------------------------------------------------- inputs


def problem(gen: torch.Generator, rows: int, hidden: int, inter: int, slots: int, top_k: int,
            dtype: torch.dtype, empty: int | None = None) -> dict:
    """Received rows (strided, as unpack gives), slot ids with unused entries, weights, expert weights."""
    x = torch.randn(rows, hidden + 8, generator=gen).to(dtype)[:, :hidden]
    pick = torch.stack([torch.randperm(slots + 2, generator=gen)[:top_k] for _ in range(rows)])
    ids = torch.where(pick >= slots, -1, pick).int()
    if empty is not None:
        ids[ids == empty] = -1
    return dict(x=x, slots=ids, weights=torch.rand(rows, top_k, generator=gen),
                w_gate_up=(torch.randn(slots, 2 * inter, hidden, generator=gen) / hidden ** 0.5).to(dtype),
                w_down=(torch.randn(slots, hidden, inter, generator=gen) / inter ** 0.5).to(dtype))


def upcast(p: dict) -> dict:
    return {k: v.float() if v.is_floating_point() else v for k, v in p.items()}


def sizes(slots: torch.Tensor, count: int) -> list[int]:
    return [int((slots == s).sum()) for s in range(count)]


# ---------------------------------------------------------------- tests

CASES = [  # rows, hidden, inter, slots, top_k, empty slot
    (1, 32, 16, 3, 1, None),
    (9, 32, 16, 4, 3, 2),
    (23, 40, 24, 5, 4, 0),
    (40, 48, 16, 3, 2, None),
]
SMALL_TILES = ((16, 16, 16, 2, 4, 2), (16, 32, 16, 3, 4, 2))  # several tiles a slot, partial bands, K tails


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_triton_grouped_swiglu_matches_the_loop(gen, interpreted, case, dtype: torch.dtype) -> None:
    rows, hidden, inter, slots, top_k, empty = case
    p = problem(gen, rows, hidden, inter, slots, top_k, dtype, empty)
    groups = group_by_slot(p["slots"], slots)
    used = int(groups.offsets[-1])
    ref = upcast(p)
    want = grouped_swiglu_reference(ref["x"], groups, ref["w_gate_up"], ref["w_down"])[:used]
    for configs in (None, SMALL_TILES):
        got = interpreted(_triton_ys, p["x"], groups, p["w_gate_up"], p["w_down"], None, configs)
        assert got.shape == (rows * top_k, hidden) and got.dtype == dtype
        torch.testing.assert_close(got[:used].float(), want, **TOL[dtype])
    got = interpreted(_triton_ys, p["x"], groups, p["w_gate_up"], p["w_down"], used, SMALL_TILES)
    assert got.shape == (used, hidden)
    torch.testing.assert_close(got.float(), want, **TOL[dtype])


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_run_experts_triton_matches_the_loop(gen, interpreted, dtype: torch.dtype, exact: bool) -> None:
    rows, hidden, inter, slots, top_k, empty = CASES[2]
    p = problem(gen, rows, hidden, inter, slots, top_k, dtype, empty)
    slot_sizes = sizes(p["slots"], slots) if exact else None
    count = (torch.ones(slots, dtype=torch.int32), torch.tensor(1, dtype=torch.int32))
    got, counted = interpreted(_run_experts_counting, **p, slot_sizes=slot_sizes, backend="triton",
                               count=count)
    assert torch.equal(counted, 1 + _received(p["slots"], slots))  # counted inside the unpermute kernel
    assert got.shape == (rows, hidden) and got.dtype == dtype
    want = run_experts_loop(**upcast(p), slot_sizes=slot_sizes)
    torch.testing.assert_close(got.float(), want, **TOL[dtype])
    torch.testing.assert_close(run_experts_loop(**upcast(p)), want, **TOL[torch.float32])


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no _grouped_mm")
def test_grouped_mm_backend_matches_the_loop(gen) -> None:
    rows, hidden, inter, slots, top_k, empty = CASES[1]
    p = problem(gen, rows, hidden, inter, slots, top_k, torch.bfloat16, empty)
    want = run_experts_loop(**upcast(p))
    for slot_sizes in (None, sizes(p["slots"], slots)):
        counts = torch.zeros(slots, dtype=torch.int32)
        got = run_experts(**p, slot_sizes=slot_sizes, backend="grouped_mm", count=(counts, None))
        torch.testing.assert_close(got.float(), want, **TOL[torch.bfloat16])
        assert torch.equal(counts, _received(p["slots"], slots))
    counts = torch.zeros(slots, dtype=torch.int32)
    run_experts(**upcast(p), backend="loop", count=(counts, torch.tensor(0, dtype=torch.int32)))
    assert not counts.any()  # recording off


def _halves_out_of_order(first: dict, second: dict, backend: str):
    """Two batches' experts started one after the other and finished in reverse order, as the
    interleaved stack keeps one range's first half alive while it issues another's work."""
    from moe_runtime.experts import finish_experts, start_experts

    a = start_experts(**first, backend=backend)
    b = start_experts(**second, backend=backend)
    return finish_experts(b), finish_experts(a)


@pytest.mark.parametrize("backend", ["loop", "triton", "grouped_mm"])
def test_experts_split_at_the_down_projection_equal_run_experts(gen, interpreted, backend: str) -> None:
    if backend == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    rows, hidden, inter, slots, top_k, empty = CASES[2]
    dtype = torch.float32 if backend == "loop" else torch.bfloat16
    first = problem(gen, rows, hidden, inter, slots, top_k, dtype, empty)
    second = problem(gen, rows // 2 + 1, hidden, inter, slots, top_k, dtype)
    second.update(w_gate_up=first["w_gate_up"], w_down=first["w_down"])  # one layer's experts
    second["slots"][:] = -1  # a range that brings this rank no assignments
    for p in (first, second):
        p["slot_sizes"] = sizes(p["slots"], slots)
    call = interpreted if backend == "triton" else (lambda f, *a: f(*a))
    got_second, got_first = call(_halves_out_of_order, first, second, backend)
    for p, got in ((first, got_first), (second, got_second)):
        want = run_experts_loop(**upcast({k: v for k, v in p.items() if k != "slot_sizes"}))
        assert got.shape == p["x"].shape and got.dtype == dtype
        torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


def test_grouped_swiglu_refuses_the_loop_backend(gen) -> None:
    p = problem(gen, 2, 32, 16, 2, 1, torch.float32)
    with pytest.raises(ValueError, match="'triton' or 'grouped_mm'"):
        grouped_swiglu(p["x"], group_by_slot(p["slots"], 2), p["w_gate_up"], p["w_down"], "loop")


def _tile_table(offsets, block_m, tiles):
    from kernels.expert_ffn_triton import tile_table

    return tile_table(offsets, block_m, tiles, force_triton=True)


@pytest.mark.parametrize("kernel", [False, True])
def test_tile_table_names_each_tiles_slot_and_first_row(interpreted, kernel: bool) -> None:
    from kernels.expert_ffn_triton import tile_table

    counts = [5, 0, 16, 1]
    offsets = torch.tensor([0, 5, 5, 21, 22], dtype=torch.int32)
    slot, row = interpreted(_tile_table, offsets, 8, 9) if kernel else tile_table(offsets, 8, 9)
    want = [(s, sum(counts[:s]) + 8 * i) for s, n in enumerate(counts) for i in range(-(-n // 8))]
    assert list(zip(slot.tolist()[:len(want)], row.tolist()[:len(want)], strict=True)) == want
    assert slot.tolist()[len(want):] == [len(counts)] * (9 - len(want))


@pytest.mark.parametrize("slots, block_m, extra", [(1, 16, 0), (7, 16, 3), (40, 64, 40), (130, 16, 5)])
def test_tile_table_kernel_matches_the_reference(interpreted, slots: int, block_m: int, extra: int) -> None:
    """Random segment sizes with empty slots, more tiles than needed (the runtime sizes the table for a
    host bound): the same slot for every tile and the same first row for every tile in use."""
    from kernels.expert_ffn_triton import tile_table_reference

    seed = int(torch.randint(0, 2**31, ()))
    print(f"seed {seed}")
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, 3 * block_m, (slots,), generator=gen) * (torch.rand(slots, generator=gen) > 0.3)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int32), sizes.cumsum(0).to(torch.int32)])
    tiles = int((-(-sizes // block_m)).sum()) + extra
    got_slot, got_row = interpreted(_tile_table, offsets, block_m, tiles)
    want_slot, want_row = tile_table_reference(offsets, block_m, tiles)
    assert torch.equal(got_slot, want_slot)
    used = want_slot < slots
    assert torch.equal(got_row[used], want_row[used]) and (got_row[~used] == 0).all()


def fake_cuda(dtype: torch.dtype) -> SimpleNamespace:
    return SimpleNamespace(is_cuda=True, dtype=dtype, shape=(64, 7168), device="cuda:0")


@pytest.mark.parametrize("dtype, rows, host_sizes, capability, want", [
    (torch.bfloat16, 8 * 16, False, (9, 0), "triton"),
    (torch.bfloat16, 8 * 64, True, (9, 0), "triton"),
    (torch.bfloat16, 8 * 65, False, (9, 0), "grouped_mm"),
    (torch.bfloat16, 8 * 512, True, (8, 0), "triton"),
    (torch.float32, 8 * 512, True, (9, 0), "loop"),
    (torch.float32, 8 * 512, False, (9, 0), "triton"),
    (torch.float16, 8 * 512, True, (9, 0), "triton"),
])
def test_select_backend_by_dtype_and_rows_per_slot(monkeypatch, dtype, rows, host_sizes, capability,
                                                   want) -> None:
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.setattr(expert_ffn.torch.cuda, "get_device_capability", lambda device: capability)
    assert select_backend(fake_cuda(dtype), 8, 2048, rows, host_sizes) == want
    assert select_backend(torch.zeros(2, 2, dtype=dtype), 8, 2048, rows, host_sizes) == "loop"


def test_select_backend_env_override(monkeypatch) -> None:
    monkeypatch.setattr(expert_ffn.torch.cuda, "get_device_capability", lambda device: (9, 0))
    monkeypatch.setenv(BACKEND_ENV, "loop")
    assert select_backend(fake_cuda(torch.bfloat16), 8, 2048, 8, False) == "loop"
    monkeypatch.setenv(BACKEND_ENV, "grouped_mm")
    with pytest.raises(ValueError, match="cannot take torch.float32"):
        select_backend(fake_cuda(torch.float32), 8, 2048, 8, False)
    monkeypatch.setenv(BACKEND_ENV, "cutlass")
    with pytest.raises(ValueError, match="expected one of"):
        select_backend(fake_cuda(torch.bfloat16), 8, 2048, 8, False)


@pytest.mark.parametrize("rows, inter, dtype", [(1, 16, torch.float32), (3, 48, torch.bfloat16),
                                               (130, 1536, torch.bfloat16), (5, 1536, torch.float32)])
def test_silu_mul_kernel_matches_torch(interpreted, rows: int, inter: int, dtype: torch.dtype) -> None:
    """The fused activation against silu(gate) * up, on a strided h (a view of a wider buffer)."""
    seed = int(torch.randint(0, 2**31, ()))
    print(f"seed {seed}")
    h = (3 * torch.randn(rows, 2 * inter + 24, generator=torch.Generator().manual_seed(seed))).to(dtype)
    h = h[:, :2 * inter]
    got = interpreted(_silu_mul, h)
    gate, up = h.float().chunk(2, dim=-1)
    want = (torch.nn.functional.silu(gate) * up).to(dtype)
    assert got.shape == (rows, inter) and got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])
    assert torch.equal(expert_ffn.silu_mul(h), torch.nn.functional.silu(h[:, :inter]) * h[:, inter:])


def test_silu_mul_kernel_leaves_the_rows_past_used_unwritten(interpreted) -> None:
    """Capacity mode sizes h for the worst case: the rows past the assignments in use (a device count,
    no sync) are not computed, which the poisoned output shows."""
    h = torch.randn(37, 2 * 48)
    got = interpreted(_silu_mul, h, torch.tensor([21], dtype=torch.int32))
    gate, up = h.chunk(2, dim=-1)
    torch.testing.assert_close(got[:21], torch.nn.functional.silu(gate[:21]) * up[:21], **TOL[torch.float32])
    assert got[21:].isnan().all()


# ---------------------------------------------------------------- compiled for the H200 (no GPU needed)


@pytest.mark.parametrize("dtype, rows_per_slot", [(torch.bfloat16, 8), (torch.bfloat16, 32),
                                                  (torch.bfloat16, 64), (torch.bfloat16, 512),
                                                  (torch.float32, 64)])
@pytest.mark.skipif(not sm90.AVAILABLE, reason="triton without its CUDA backend")
def test_default_gemm_configs_compile_for_h200_without_spills(dtype: torch.dtype, rows_per_slot: int) -> None:
    from kernels.expert_ffn_triton import _grouped_gemm_kernel, default_configs

    ty = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    ints = ("stride_a", "stride_bs", "stride_bn", "stride_c", "up_offset")
    signature = {**dict.fromkeys(("a_ptr", "b_ptr", "c_ptr"), f"*{ty}"), **dict.fromkeys(ints, "i32"),
                 **dict.fromkeys(("rows_ptr", "tile_slot_ptr", "tile_row_ptr", "offsets_ptr"), "*i32"),
                 "m_tiles": "i32", "slots": "i32"}
    aligned = [k for k in signature if k not in ("m_tiles", "slots")]
    for config, swiglu, (n, k) in zip(default_configs(rows_per_slot, dtype), (True, False),
                                      ((2048, 7168), (7168, 2048)), strict=True):
        constexprs = dict(N=n, K=k, GATHER=swiglu, SWIGLU=swiglu, UPCAST=False,
                          PRECISION="ieee" if ty == "fp32" else "tf32", BLOCK_M=config.block_m,
                          BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m)
        kernel, _ = sm90.compile_sm90(_grouped_gemm_kernel, signature, constexprs, aligned, config.num_warps,
                                      config.num_stages)
        if ty == "bf16" and config.block_m >= 64:
            assert "warp_group_dot" in kernel.asm["ttgir"], "expected wgmma on sm_90a"


@pytest.mark.skipif(not sm90.AVAILABLE, reason="triton without its CUDA backend")
def test_silu_mul_compiles_for_h200_without_spills() -> None:
    from kernels.expert_ffn_triton import _silu_mul_kernel

    signature = {"h_ptr": "*bf16", "out_ptr": "*bf16", "stride_h": "i32", "stride_out": "i32", "rows": "i32",
                 "used_ptr": "*i32", "inter": "i32"}
    aligned = ["h_ptr", "out_ptr", "used_ptr", "stride_h", "stride_out", "inter"]
    for has_used in (False, True):
        constexprs = dict(HAS_USED=has_used, BLOCK_R=2, BLOCK_I=1024)
        sm90.compile_sm90(_silu_mul_kernel, signature, constexprs, aligned, num_warps=4)


@pytest.mark.parametrize("padded_slots", [64, 512])
@pytest.mark.skipif(not sm90.AVAILABLE, reason="triton without its CUDA backend")
def test_tile_table_compiles_for_h200_without_spills(padded_slots: int) -> None:
    from kernels.expert_ffn_triton import _tile_table_kernel

    signature = {"offsets_ptr": "*i32", "slot_ptr": "*i32", "row_ptr": "*i32", "slots": "i32", "tiles": "i32",
                 "block_m": "i32"}
    sm90.compile_sm90(_tile_table_kernel, signature, dict(SP=padded_slots, BLOCK=16),
                      ["offsets_ptr", "slot_ptr", "row_ptr"], num_warps=4)
