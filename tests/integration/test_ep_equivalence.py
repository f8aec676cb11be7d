"""The EP MoE forward equals the dense single-process reference, on real gloo groups of 1, 2 and 4 ranks.

Every rank builds the same weights, placements and tokens from fixed seeds, runs its share of
the tokens through the EP stack and compares with the dense reference over all tokens. Counter
checks that need every rank's view happen in the parent process.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from distributed import WorkerError, run_world

from balancerd.placement import PlacementError
from kernels.route import route_reference
from moe_runtime import (
    PHASES,
    Counters,
    DispatchConfig,
    EPMoELayer,
    EPMoEStack,
    LogicalWeights,
    MoEConfig,
    RuntimePlacement,
    dense_moe,
    ep_group,
)
from moe_runtime import layer as moe_layer
from moe_runtime.config import NORM_EPS

pytestmark = pytest.mark.slow

SEED = 1234
E, SLOTS, EVERYWHERE = 16, 24, 5  # EVERYWHERE: the expert with a replica on every rank
SMALL = dict(layers=2, hidden=32, intermediate=16, experts=E, top_k=4)
CONFIGS = {
    "deepseek-v3": MoEConfig.preset("deepseek-v3", groups=4, topk_groups=2, **SMALL),
    "qwen3-235b-a22b": MoEConfig.preset("qwen3-235b-a22b", **SMALL),
}
EXACT_TOKENS = (13, 0, 7, 20)  # uneven, one rank idle: exact mode allows it
CAPACITY_TOKENS = 12           # capacity mode needs the same count on every rank
DROP_FACTOR, DROP_TOKENS = 1.0, 16  # capacity ceil(16 * 4 / 24) = 3 a slot
# Pipelined (micro-batched) and interleaved forwards must equal the whole-batch ones; 3 ranges of
# EXACT_TOKENS include empty ones (the idle rank's) and ranges of one token.
DISPATCH = {
    "exact": DispatchConfig("exact"),
    "capacity": DispatchConfig("capacity"),
    "exact-pipelined": DispatchConfig("exact", micro_batches=3),
    "capacity-pipelined": DispatchConfig("capacity", micro_batches=2),
    "exact-interleaved": DispatchConfig("exact", micro_batches=3, interleave=True),
    "capacity-interleaved": DispatchConfig("capacity", micro_batches=2, interleave=True),
}


def random_placement(layers: int, world: int, rng: np.random.Generator) -> np.ndarray:
    """[layers, SLOTS]: every expert at least once, EVERYWHERE on every rank, the rest random replicas."""
    rows = []
    for _ in range(layers):
        extra = rng.integers(0, E, SLOTS - world - E + 1)
        rest = np.concatenate([np.delete(np.arange(E), EVERYWHERE), extra])
        rng.shuffle(rest)
        chunks = np.split(rest, world)
        rows.append(np.concatenate([rng.permutation(np.append(c, EVERYWHERE)) for c in chunks]))
    return np.stack(rows)


def replica_slots(ids: np.ndarray, row: np.ndarray, source: int) -> np.ndarray:
    """The replica rule restated: the n-th assignment of expert e from `source` (in token-major
    order) takes replica (n + source) % r, replicas in ascending slot order."""
    slots_of = {e: np.flatnonzero(row == e) for e in range(E)}
    seen: Counter = Counter()
    out = np.empty(ids.shape, np.int64)
    for pos, e in enumerate(ids.reshape(-1)):
        reps = slots_of[int(e)]
        out.flat[pos] = reps[(seen[e] + source) % len(reps)]
        seen[e] += 1
    return out


def expert_out(w: LogicalWeights, e: int, x: torch.Tensor) -> torch.Tensor:
    half = w.w_gate_up.shape[1] // 2
    return (F.silu(x @ w.w_gate_up[e, :half].T) * (x @ w.w_gate_up[e, half:].T)) @ w.w_down[e].T


def reference(x: torch.Tensor, weights: list[LogicalWeights], cfg: MoEConfig, bias: torch.Tensor | None):
    """The dense stack, plus each layer's routed ids with and without the selection bias."""
    ids, unbiased = [], []
    for layer, w in enumerate(weights):
        h = F.rms_norm(x, (x.shape[1],), eps=NORM_EPS)
        y, r = dense_moe(h, w, cfg, None if bias is None else bias[layer])
        logits = F.linear(h, w.router, w.router_bias)
        plain = route_reference(logits, cfg.routing_spec(), correction_bias=w.correction_bias)
        ids.append(r.ids.numpy())
        unbiased.append(plain.ids.numpy())
        x = x + y
    return x, ids, unbiased


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # outputs are O(1)


def check_bad_inputs(group, cfg: MoEConfig) -> None:
    """Each of these fails on every rank before any collective."""
    rng = np.random.default_rng(SEED)
    good = random_placement(cfg.layers, group.world, rng)
    per_rank = SLOTS // group.world
    missing = np.where(good == 3, 4, good)
    with pytest.raises(PlacementError, match="expert 3 has no replica"):
        RuntimePlacement(missing, E, per_rank)
    out_of_range = good.copy()
    out_of_range[1, 2] = E
    with pytest.raises(PlacementError, match=rf"layer 1 slot 2 holds expert {E}, outside"):
        RuntimePlacement(out_of_range, E, per_rank)
    placement = RuntimePlacement(random_placement(cfg.layers, 2 * group.world, rng), E, per_rank // 2)
    with pytest.raises(ValueError, match=f"placement is for {2 * group.world} ranks .* the EP group has"):
        EPMoELayer(cfg, 0, group, placement)
    if group.group is not None:
        with pytest.raises(ValueError, match="device cuda needs the nccl backend .* uses 'gloo'"):
            ep_group(device="cuda")


def check_equivalence(rank: int, group, cfg: MoEConfig, mode: str) -> dict:
    """Forward, compare, switch placement in place, forward again with recording off, compare."""
    world, layers = group.world, cfg.layers
    rng = np.random.default_rng(SEED)
    phys_to_log = random_placement(layers, world, rng)
    placement = RuntimePlacement(phys_to_log, E, SLOTS // world)
    gen = torch.Generator().manual_seed(SEED)
    weights = [dataclasses.replace(LogicalWeights.random(cfg, layer, SEED),
                                   router_bias=torch.randn(E, generator=gen)) for layer in range(layers)]
    exact = DISPATCH[mode].mode == "exact"
    bias = torch.randn(layers, E, generator=gen) * 0.05 if exact else None
    tokens = EXACT_TOKENS[:world] if exact else (CAPACITY_TOKENS,) * world
    x_all = torch.randn(sum(tokens), cfg.hidden, generator=gen)
    mine = slice(sum(tokens[:rank]), sum(tokens[:rank + 1]))
    want, ids, unbiased = reference(x_all, weights, cfg, bias)

    counters = Counters(layers, E, SLOTS // world)
    stack = EPMoEStack(cfg, group, placement, dispatch=DISPATCH[mode], counters=counters,
                       selection_bias=bias)
    stack.load_weights(weights)
    assert_close(stack(x_all[mine]), want[mine])
    seen = {name: getattr(counters, name).numpy().copy()
            for name in ("routed", "received", "dropped", "bias_changed")}

    placement.update(random_placement(layers, world, rng), version=1)
    stack.load_weights(weights)
    counters.set_recording(False)
    assert_close(stack(x_all[mine]), want[mine])
    for name, value in seen.items():
        assert np.array_equal(getattr(counters, name).numpy(), value), f"{name} counted while not recording"
    return dict(seen, phys_to_log=phys_to_log, ids=[i[mine] for i in ids],
                unbiased=[u[mine] for u in unbiased])


def check_drops(rank: int, group, micro_batches: int) -> dict:
    """Capacity mode with the drop policy: per (source rank, slot), the lowest-weight assignments beyond
    capacity drop (ties: the higher token), exactly those, and they are counted; micro-batches drop
    what the whole batch would."""
    world = group.world
    cfg = dataclasses.replace(CONFIGS["qwen3-235b-a22b"], layers=1)
    rng = np.random.default_rng(SEED + 1)
    row = random_placement(1, world, rng)
    per_rank = SLOTS // world
    w = LogicalWeights.random(cfg, 0, SEED)
    x = torch.randn(world, DROP_TOKENS, cfg.hidden, generator=torch.Generator().manual_seed(SEED))[rank]
    counters = Counters(1, E, per_rank)
    layer = EPMoELayer(cfg, 0, group, RuntimePlacement(row, E, per_rank),
                       dispatch=DispatchConfig("capacity", DROP_FACTOR, micro_batches), counters=counters)
    layer.load_weights(w)
    got = layer(x)

    r = route_reference(F.linear(x, w.router), cfg.routing_spec())
    ids, weights = r.ids.numpy(), r.weights.numpy()
    slots = replica_slots(ids, row[0], rank)
    capacity = math.ceil(DROP_FACTOR * DROP_TOKENS * cfg.top_k / SLOTS)
    keep = np.ones(ids.shape, bool)
    for s in np.unique(slots):
        sent = sorted(zip(*np.nonzero(slots == s), strict=True), key=lambda tj: (-weights[tj], tj[0]))
        for tj in sent[capacity:]:
            keep[tj] = False
    want = torch.zeros_like(x)
    for t, j in zip(*np.nonzero(keep), strict=True):
        want[t] += float(weights[t, j]) * expert_out(w, int(ids[t, j]), x[t])
    assert_close(got, want)
    assert counters.dropped[0].item() == (~keep).sum() > 0
    assert keep.all(1).any(), "some tokens keep every assignment"
    return dict(routed=counters.routed.numpy().copy(), received=counters.received.numpy().copy(),
                dropped=counters.dropped.numpy().copy())


def all_checks(rank: int, world: int) -> dict:
    group = ep_group()
    assert (group.rank, group.world) == (rank, world)
    check_bad_inputs(group, CONFIGS["qwen3-235b-a22b"])
    out = {(name, mode): check_equivalence(rank, group, cfg, mode)
           for name, cfg in CONFIGS.items() for mode in DISPATCH}
    out["drops"] = check_drops(rank, group, 1)
    out["drops-pipelined"] = check_drops(rank, group, 3)
    return out


@pytest.mark.parametrize("world", [1, 2, 4])
def test_ep_forward_and_counters_match_dense_reference(world: int) -> None:
    results = [all_checks(0, 1)] if world == 1 else run_world(all_checks, world, timeout=150)
    per_rank = SLOTS // world
    for name, mode in [(n, m) for n in CONFIGS for m in DISPATCH]:
        runs = [res[name, mode] for res in results]
        for layer in range(CONFIGS[name].layers):
            row = runs[0]["phys_to_log"][layer]
            received = np.zeros(SLOTS, np.int64)
            for src, run in enumerate(runs):
                ids, unbiased = run["ids"][layer], run["unbiased"][layer]
                assert np.array_equal(run["routed"][layer], np.bincount(ids.reshape(-1), minlength=E))
                config = DISPATCH[mode]  # interleaved ranges each spread their assignments over replicas
                for part in config.token_ranges(len(ids)) if config.interleave else [slice(None)]:
                    np.add.at(received, replica_slots(ids[part], row, src).reshape(-1), 1)
                changed = sum(len(set(a) - set(b))
                              for a, b in zip(ids.tolist(), unbiased.tolist(), strict=True))
                assert run["bias_changed"][layer] == changed
                assert run["dropped"][layer] == 0
            assert np.array_equal(np.concatenate([run["received"][layer] for run in runs]), received)
            assert received.sum() == sum(run["routed"][layer].sum() for run in runs)
        total_changed = sum(run["bias_changed"].sum() for run in runs)
        assert (total_changed > 0) == (DISPATCH[mode].mode == "exact"), \
            "the bias changes assignments, and only when set"
    for key in ("drops", "drops-pipelined"):
        drops = [res[key] for res in results]
        routed = sum(d["routed"].sum() for d in drops)
        assert sum(d["received"].sum() for d in drops) == routed - sum(d["dropped"].sum() for d in drops)
        assert all(d["received"].shape == (1, per_rank) for d in drops)
    for res in results:
        for name in ("routed", "received", "dropped"):
            assert np.array_equal(res["drops"][name], res["drops-pipelined"][name])


def test_counters_snapshot_reset_timings_and_off_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, tokens = CONFIGS["deepseek-v3"], 9
    group = ep_group()
    placement = RuntimePlacement(random_placement(cfg.layers, 1, np.random.default_rng(SEED)), E, SLOTS)
    weights = [LogicalWeights.random(cfg, layer, SEED) for layer in range(cfg.layers)]
    counters = Counters(cfg.layers, E, SLOTS)
    counted = EPMoEStack(cfg, group, placement, counters=counters)
    counted.load_weights(weights)
    x = torch.randn(tokens, cfg.hidden, generator=torch.Generator().manual_seed(SEED))
    want = counted(x)

    host = counters.host_buffers()
    counters.snapshot_into(host)
    assert host.routed.sum(1).tolist() == host.received.sum(1).tolist() == [tokens * cfg.top_k] * cfg.layers
    timings = counters.drain_timings()
    assert set(timings) == set(PHASES)
    assert all(t.shape == (cfg.layers,) and (t > 0).all() for t in timings.values())
    assert all((t == 0).all() for t in counters.drain_timings().values())
    counters.reset()
    assert counters.routed.sum() == counters.received.sum() == 0
    assert host.routed.sum() == tokens * cfg.top_k * cfg.layers

    calls = []
    real_route = moe_layer.route
    monkeypatch.setattr(moe_layer, "route", lambda *a, **kw: calls.append(kw) or real_route(*a, **kw))
    plain = EPMoEStack(cfg, group, placement)
    plain.load_weights(weights)
    assert_close(plain(x), want)
    assert len(calls) == cfg.layers
    assert all(kw["counts"] is None and kw["record"] is None for kw in calls)


def _fail_or_hang(rank: int, world: int) -> None:
    if rank == 1:
        raise RuntimeError("rank one fails on purpose")
    time.sleep(600)


def _hang(rank: int, world: int) -> None:
    if rank == 0:
        torch.distributed.barrier()  # rank 1 never joins
    time.sleep(600)


def test_run_world_reports_a_failed_rank_and_stops_the_others() -> None:
    match = r"(?s)rank 1 failed.*rank one fails on purpose.*ranks \[0\] were stopped"
    with pytest.raises(WorkerError, match=match):
        run_world(_fail_or_hang, 2, timeout=60)


def test_run_world_times_out_instead_of_hanging() -> None:
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[0, 1\] of 2 did not finish within 10 s"):
        run_world(_hang, 2, timeout=10)
    assert time.monotonic() - start < 30
