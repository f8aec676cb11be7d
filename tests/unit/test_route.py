"""kernels.route: the torch reference against a per-token loop, the Triton kernel (interpreted on CPU)
against the reference.

Inputs are fresh each run (the seed is printed). Logits and biases come from coarse grids, so equal
inputs give exact ties that both sides must break by lower index; rows where two different inputs
land too close to each other at a decision boundary are redrawn, because there the last-ulp
differences between torch's and Triton's exp/sigmoid may legitimately pick either side.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import triton
from triton_worker import interpreter_worker

from kernels.route import RouteOutput, RoutingSpec, route, route_reference
from kernels.route_triton import LaunchConfig, _route_kernel, kernel_constants

# A decision is clear when the float64 gap exceeds REL_TOL * (|selection score| + 8 * score) of the two
# sides: float32 rounding of the sums is ~1e-7 * |selection score|, exp/sigmoid and the softmax sum
# differ by at most a few ulp of the score.
REL_TOL = 1e-6

SPECS = {
    "softmax-8": RoutingSpec("softmax", 8, 2),
    "softmax-60-raw": RoutingSpec("softmax", 60, 8, renormalize=False),
    "qwen3-128": RoutingSpec("softmax", 128, 8),
    "sigmoid-8": RoutingSpec("sigmoid_grouped", 8, 2, scale=1.5),
    "grouped-60": RoutingSpec("sigmoid_grouped", 60, 6, groups=4, topk_groups=2),
    "grouped-128": RoutingSpec("sigmoid_grouped", 128, 8, groups=8, topk_groups=4, scale=2.5),
    "deepseek-v3-256": RoutingSpec("sigmoid_grouped", 256, 8, groups=8, topk_groups=4, scale=2.5),
}


@pytest.fixture(scope="module")
def interpreted():
    """Run `route_triton` in the interpreter worker (triton_worker). Returns (RouteOutput, counts after)."""
    with interpreter_worker(("kernels.route_triton", "_route_kernel"), timeout=120) as run:

        def call(launch: tuple[int, ...] | None = None, **kwargs) -> tuple[RouteOutput, torch.Tensor | None]:
            return run(_interpret_route, launch, kwargs)

        yield call


def _interpret_route(launch: tuple[int, ...] | None, kwargs: dict) -> tuple[RouteOutput, torch.Tensor | None]:
    route_triton = importlib.import_module("kernels.route_triton")
    config = None if launch is None else route_triton.LaunchConfig(*launch)
    out = route_triton.route_triton(**kwargs, launch=config)
    return RouteOutput(*(t.clone() for t in out)), kwargs.get("counts")


# ---------------------------------------------------------------- inputs


def _scores64(logits: torch.Tensor, spec: RoutingSpec) -> torch.Tensor:
    x = logits.double()
    return torch.softmax(x, dim=-1) if spec.kind == "softmax" else torch.sigmoid(x)


def _robust(sel: list[float], scores: list[float], keys: list[tuple], spec: RoutingSpec) -> bool:
    """Every comparison the routing makes is either clear (REL_TOL) or an exact tie of equal inputs."""
    mag = [abs(v) + 8 * s for v, s in zip(sel, scores, strict=True)]

    def separated(hi: float, lo: float, scale: float, same_inputs: bool) -> bool:
        gap = hi - lo
        return gap > REL_TOL * scale or (gap == 0 and same_inputs)

    def experts_separated(hi: int, lo: int) -> bool:
        return separated(sel[hi], sel[lo], max(mag[hi], mag[lo]), keys[hi] == keys[lo])

    eligible = list(range(spec.experts))
    if spec.groups > 1:
        size = spec.group_size
        sums, pairs = [], []
        for g in range(spec.groups):
            members = sorted(range(g * size, (g + 1) * size), key=lambda e: (-sel[e], e))
            if size > 2 and not experts_separated(members[1], members[2]):
                return False
            sums.append(sel[members[0]] + sel[members[1]])
            pairs.append(members[:2])
        order = sorted(range(spec.groups), key=lambda g: (-sums[g], g))

        def groups_separated(hi: int, lo: int, exact_tie_allowed: bool = True) -> bool:
            scale = sum(mag[e] for e in pairs[hi] + pairs[lo])
            same = exact_tie_allowed and (sorted(keys[e] for e in pairs[hi])
                                          == sorted(keys[e] for e in pairs[lo]))
            return separated(sums[hi], sums[lo], scale, same)

        if not _decided(order, spec.topk_groups, groups_separated):
            return False
        eligible = [e for e in eligible if e // size in order[:spec.topk_groups]]
    order = sorted(eligible, key=lambda e: (-sel[e], e))

    def members_separated(hi: int, lo: int, exact_tie_allowed: bool = True) -> bool:
        return separated(sel[hi], sel[lo], max(mag[hi], mag[lo]), exact_tie_allowed and keys[hi] == keys[lo])

    return _decided(order, spec.top_k, members_separated)


def _decided(order: list[int], picks: int, separated) -> bool:
    """The first ``picks`` of ``order`` (best first) are unambiguous: every neighbouring pair up to the
    last pick is clearly apart or an exact tie of equal inputs, and so is every pair of the tie that
    straddles the last pick (equal inputs tie exactly; different inputs with equal exact values can
    round either way in float32, so such a tie must not reach across the boundary)."""
    for i, (hi, lo) in enumerate(zip(order, order[1:], strict=False)):
        if i >= picks and separated(hi, lo, exact_tie_allowed=False):
            return True
        if not separated(hi, lo):
            return False
    return True


def draw(gen: torch.Generator, spec: RoutingSpec, tokens: int, *, correction: bool, selection: bool,
         dtype: torch.dtype = torch.float32) -> dict:
    """Grid-valued logits [T, E] and biases whose routing decisions are numerically unambiguous."""
    experts = spec.experts
    grid_l = torch.randint(-16, 17, (tokens, experts), generator=gen)
    zeros = torch.zeros(experts, dtype=torch.long)
    grid_c = torch.randint(-8, 9, (experts,), generator=gen) if correction else zeros
    grid_s = torch.randint(-4, 5, (experts,), generator=gen) if selection else zeros
    cb, sb = grid_c.double() / 32, grid_s.double() / 64
    for _ in range(200):
        scores = _scores64(grid_l / 4, spec)
        bad = []
        for t in range(tokens):
            row = scores[t].tolist()
            unbiased = list(zip(grid_l[t].tolist(), grid_c.tolist(), strict=True))
            biased = list(zip(grid_l[t].tolist(), grid_c.tolist(), grid_s.tolist(), strict=True))
            if not (_robust((scores[t] + cb).tolist(), row, unbiased, spec)
                    and _robust((scores[t] + cb + sb).tolist(), row, biased, spec)):
                bad.append(t)
        if not bad:
            break
        grid_l[bad] = torch.randint(-16, 17, (len(bad), experts), generator=gen)
    else:
        raise AssertionError("could not draw unambiguous rows")
    return {
        "logits": (grid_l.float() / 4).to(dtype),
        "correction_bias": cb.float() if correction else None,
        "selection_bias": sb.float() if selection else None,
    }


# ---------------------------------------------------------------- independent per-token oracle


def loop_route(logits: torch.Tensor, spec: RoutingSpec, correction_bias, selection_bias):
    """Straightforward float64 per-token routing: ids, weights and changed as Python lists / int."""
    experts, size = spec.experts, spec.group_size
    cb = [0.0] * experts if correction_bias is None else correction_bias.tolist()
    sb = [0.0] * experts if selection_bias is None else selection_bias.tolist()

    def pick(sel: list[float]) -> list[int]:
        eligible = range(experts)
        if spec.groups > 1:
            sums = [sum(sorted(sel[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(spec.groups)]
            best = sorted(range(spec.groups), key=lambda g: (-sums[g], g))[:spec.topk_groups]
            eligible = [e for e in eligible if e // size in best]
        return sorted(eligible, key=lambda e: (-sel[e], e))[:spec.top_k]

    all_ids, all_weights, changed = [], [], 0
    for row in logits.double().tolist():
        if spec.kind == "softmax":
            top = max(row)
            exps = [math.exp(v - top) for v in row]
            scores = [v / sum(exps) for v in exps]
        else:
            scores = [1 / (1 + math.exp(-v)) for v in row]
        sel = [s + c for s, c in zip(scores, cb, strict=True)]
        unbiased = pick(sel)
        ids = pick([s + b for s, b in zip(sel, sb, strict=True)])
        changed += len(set(ids) - set(unbiased))
        weights = [scores[e] for e in ids]
        if spec.renormalize:
            weights = [w / sum(weights) for w in weights]
        all_ids.append(ids)
        all_weights.append([w * spec.scale for w in weights])
    return all_ids, all_weights, changed


# ---------------------------------------------------------------- reference


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("selection", [False, True])
def test_reference_matches_per_token_loop(gen, name, selection):
    spec = SPECS[name]
    inputs = draw(gen, spec, 7, correction=spec.kind == "sigmoid_grouped", selection=selection)
    counts = torch.randint(0, 100, (spec.experts,), dtype=torch.int32, generator=gen)
    before = counts.clone()
    out = route_reference(**inputs, spec=spec, counts=counts)
    ids, weights, changed = loop_route(inputs["logits"], spec, inputs["correction_bias"],
                                       inputs["selection_bias"])
    assert out.ids.dtype == torch.int64 and out.weights.dtype == torch.float32
    assert out.changed.dtype == torch.int64 and out.changed.shape == ()
    assert out.ids.tolist() == ids
    torch.testing.assert_close(out.weights, torch.tensor(weights, dtype=torch.float32), rtol=1e-5, atol=1e-7)
    assert int(out.changed) == changed
    expected = before + torch.bincount(torch.tensor(ids).flatten(), minlength=spec.experts).int()
    assert torch.equal(counts, expected)


def test_reference_breaks_ties_by_lower_index():
    spec = RoutingSpec("sigmoid_grouped", 8, 3, groups=4, topk_groups=2)
    # groups (0,1) (2,3) (4,5) (6,7): group 3 leads, groups 0-2 tie (group 0 kept); then 0, 1 and 7 tie
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 3.0, 1.0]])
    assert route_reference(logits, spec).ids.tolist() == [[6, 0, 1]]
    flat = RoutingSpec("softmax", 6, 4)
    assert route_reference(torch.zeros(2, 6), flat).ids.tolist() == [[0, 1, 2, 3]] * 2


def test_selection_bias_moves_choices_not_weights():
    spec = RoutingSpec("softmax", 8, 2, renormalize=False)
    logits = torch.arange(8.0).repeat(3, 1)
    bias = torch.tensor([9.0, 9.0, 0, 0, 0, 0, 0, 0])
    out = route_reference(logits, spec, selection_bias=bias)
    probs = torch.softmax(logits[0], dim=0)
    assert out.ids.tolist() == [[1, 0]] * 3 and int(out.changed) == 6
    torch.testing.assert_close(out.weights, probs[[1, 0]].repeat(3, 1))


def test_reference_record_flag_switches_counting():
    spec = SPECS["deepseek-v3-256"]
    logits = torch.randn(5, spec.experts)
    counts = torch.full((spec.experts,), 3, dtype=torch.int32)
    route_reference(logits, spec, counts=counts, record=torch.tensor(0, dtype=torch.int32))
    assert torch.equal(counts, torch.full_like(counts, 3))
    route_reference(logits, spec, counts=counts, record=torch.tensor(1, dtype=torch.int32))
    assert int(counts.sum()) == 3 * spec.experts + 5 * spec.top_k


def test_route_on_cpu_is_the_reference(gen):
    spec = SPECS["qwen3-128"]
    inputs = draw(gen, spec, 7, correction=False, selection=True)
    got, want = route(**inputs, spec=spec), route_reference(**inputs, spec=spec)
    assert torch.equal(got.ids, want.ids) and torch.equal(got.weights, want.weights)
    assert torch.equal(got.changed, want.changed)


def test_force_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        route(torch.zeros(1, 8), SPECS["softmax-8"], force_triton=True)


@pytest.mark.parametrize("kwargs, message", [
    ({"kind": "relu", "experts": 8, "top_k": 2}, "kind"),
    ({"kind": "softmax", "experts": 8, "top_k": 9}, "top_k"),
    ({"kind": "softmax", "experts": 8, "top_k": 0}, "top_k"),
    ({"kind": "softmax", "experts": 8, "top_k": 2, "groups": 2}, "no groups"),
    ({"kind": "sigmoid_grouped", "experts": 10, "top_k": 2, "groups": 4}, "divide"),
    ({"kind": "sigmoid_grouped", "experts": 8, "top_k": 2, "groups": 2, "topk_groups": 3}, "topk_groups"),
    ({"kind": "sigmoid_grouped", "experts": 8, "top_k": 2, "groups": 8}, "top-2"),
    ({"kind": "sigmoid_grouped", "experts": 256, "top_k": 40, "groups": 8, "topk_groups": 1}, "eligible"),
    ({"kind": "softmax", "experts": 8, "top_k": 2, "scale": 0.0}, "scale"),
])
def test_spec_rejects_bad_configs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RoutingSpec(**kwargs)


@pytest.mark.parametrize("change, message", [
    ({"logits": torch.zeros(2, 7)}, "logits must be"),
    ({"logits": torch.zeros(2, 8, dtype=torch.int32)}, "dtype"),
    ({"selection_bias": torch.zeros(8, dtype=torch.float64)}, "selection_bias"),
    ({"counts": torch.zeros(8, dtype=torch.int64)}, "counts"),
    ({"record": torch.tensor(1, dtype=torch.int32)}, "needs counts"),
    ({"counts": torch.zeros(8, dtype=torch.int32), "record": torch.tensor([1], dtype=torch.int32)}, "0-d"),
])
def test_reference_rejects_bad_inputs(change, message):
    args = {"logits": torch.zeros(2, 8)} | change
    with pytest.raises(ValueError, match=message):
        route_reference(spec=SPECS["softmax-8"], **args)


def test_empty_batch():
    spec = SPECS["deepseek-v3-256"]
    out = route_reference(torch.zeros(0, spec.experts), spec, selection_bias=torch.zeros(spec.experts))
    assert out.ids.shape == (0, 8) and out.weights.shape == (0, 8) and int(out.changed) == 0


# ---------------------------------------------------------------- Triton kernel, interpreted


def _one_program(tokens: int) -> tuple[int, int]:
    return max(1, 1 << math.ceil(math.log2(max(tokens, 1)))), 1


def _split_in_four(tokens: int) -> tuple[int, int]:
    return 1 << max(0, math.ceil(math.log2(max(tokens, 1) / 4))), 1


def _three_programs_looping(tokens: int) -> tuple[int, int, int]:
    """Blocks of 2 tokens over at most 3 programs: each program loops over several blocks."""
    return 2, 1, 3


VARIANTS = {  # the interpreter runs programs one after another: a few programs a call keep it quick
    # name: (correction, selection, dtype, record, launch)
    "biased-record-on-one-program": (True, True, torch.float32, 1, _one_program),
    "plain-record-off-split": (True, False, torch.float32, 0, _split_in_four),
    "bf16-biased-split": (False, True, torch.bfloat16, None, _split_in_four),
    "biased-record-on-grid-stride": (True, True, torch.float32, 1, _three_programs_looping),
}


def _assert_same(got: RouteOutput, want: RouteOutput) -> None:
    assert torch.equal(got.ids, want.ids), (got.ids != want.ids).nonzero()[:5]
    torch.testing.assert_close(got.weights, want.weights, rtol=1e-5, atol=1e-6)
    assert got.changed.dtype == torch.int64 and got.changed.shape == ()
    assert int(got.changed) == int(want.changed)


@pytest.mark.parametrize("tokens", [1, 7, 64])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", SPECS)
def test_triton_matches_reference(interpreted, gen, name, variant, tokens):
    spec = SPECS[name]
    correction, selection, dtype, record, launch = VARIANTS[variant]
    inputs = draw(gen, spec, tokens, correction=correction, selection=selection, dtype=dtype)
    counts = torch.randint(0, 1000, (spec.experts,), dtype=torch.int32, generator=gen)
    ref_counts = counts.clone()
    flag = None if record is None else torch.tensor(record, dtype=torch.int32)
    got, got_counts = interpreted(**inputs, spec=spec, counts=counts, record=flag, launch=launch(tokens))
    want = route_reference(**inputs, spec=spec, counts=ref_counts, record=flag)
    _assert_same(got, want)
    assert torch.equal(got_counts, ref_counts)


def test_triton_default_launch_without_counts_or_biases(interpreted, gen):
    spec = SPECS["deepseek-v3-256"]
    inputs = draw(gen, spec, 7, correction=False, selection=False)
    _assert_same(interpreted(**inputs, spec=spec)[0], route_reference(**inputs, spec=spec))


def test_triton_reads_strided_logits(interpreted, gen):
    spec = SPECS["qwen3-128"]
    inputs = draw(gen, spec, 7, correction=False, selection=True)
    wide = torch.zeros(7, 2 * spec.experts)
    wide[:, 1::2] = inputs["logits"]
    inputs["logits"] = wide[:, 1::2]
    _assert_same(interpreted(**inputs, spec=spec)[0], route_reference(**inputs, spec=spec))


def test_triton_empty_batch(interpreted):
    spec = SPECS["qwen3-128"]
    out, _ = interpreted(logits=torch.zeros(0, spec.experts), spec=spec,
                         selection_bias=torch.zeros(spec.experts))
    assert out.ids.shape == (0, 8) and int(out.changed) == 0


@pytest.mark.parametrize("block_t, num_warps, programs",
                         [(3, 4, None), (0, 4, None), (4, 3, None), (4, 4, 0)])
def test_launch_config_validation(block_t, num_warps, programs):
    with pytest.raises(ValueError):
        LaunchConfig(block_t, num_warps, programs)


# ---------------------------------------------------------------- Triton kernel, compiled for Hopper


@pytest.mark.parametrize("name, selection, launch", [
    ("deepseek-v3-256", True, (8, 4)),
    ("qwen3-128", False, (1, 1)),
    ("grouped-60", True, (4, 2)),
])
def test_kernel_compiles_for_hopper_without_a_gpu(name, selection, launch):
    """Ahead-of-time compile to an sm_90a cubin: catches what the interpreter accepts but the compiler
    does not (non-constexpr globals, unsupported ops on the real layouts)."""
    compiler = pytest.importorskip("triton.compiler")
    from triton.backends.compiler import GPUTarget

    if not isinstance(_route_kernel, triton.runtime.JITFunction):
        pytest.skip("triton runs interpreted in this process")
    names = [p.name for p in _route_kernel.params]
    constants = kernel_constants(SPECS[name], LaunchConfig(*launch), correction=True, selection=selection,
                                 count=True, record=True, accumulate=selection)
    types = {"logits_ptr": "*bf16", "stride_t": "i32", "cbias_ptr": "*fp32", "sbias_ptr": "*fp32",
             "counts_ptr": "*i32", "record_ptr": "*i32", "ids_ptr": "*i64", "weights_ptr": "*fp32",
             "changed_ptr": "*i64", "tokens": "i32", "blocks": "i32", "programs": "i32",
             "scale": "fp32"} | dict.fromkeys(constants, "constexpr")
    source = compiler.ASTSource(_route_kernel, types, {(names.index(k),): v for k, v in constants.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": launch[1]})
    assert compiled.asm["cubin"]


def test_inputs_with_a_tie_of_different_inputs_across_the_last_pick_are_redrawn():
    """A fresh CI run drew experts 43, 49 and 57 tied exactly in float64 at the 8th pick, 57 from other
    inputs: float32 rounding then put 57 in the reference's top 8 and 43 in the kernel's."""
    spec = SPECS["softmax-60-raw"]
    scores = [0.1] * spec.experts
    sel = [1.0 - 0.01 * e if e < 7 else 0.0 for e in range(spec.experts)]
    keys = [(e,) for e in range(spec.experts)]
    for e in (7, 8, 9):
        sel[e], keys[e] = 0.5, ("same inputs",)
    assert _robust(sel, scores, keys, spec)
    sel[10], keys[10] = 0.5, ("other inputs",)
    assert not _robust(sel, scores, keys, spec)
