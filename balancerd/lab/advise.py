"""The parallelism advisor: every EP and TP x EP layout of a model on G GPUs, predicted, and one chosen.

A layout is a replica of tp x ep GPUs (tp in 1, 2, 4, 8 and within a node; ep dividing the experts);
G / (tp x ep) replicas serve side by side, each decoding `batch` sequences. Among the layouts whose
weights and KV cache fit, the advisor recommends the highest decode throughput per GPU, among those
meeting the TPOT target when one is given; ties go to the lower TPOT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from balancerd.lab.calibration import Calibration
from balancerd.lab.costmodel import Parallelism, Prediction, Workload, predict
from balancerd.lab.models import ModelSpec

TP_SIZES = (1, 2, 4, 8)


def layouts(spec: ModelSpec, gpus: int, gpus_per_node: int) -> list[Parallelism]:
    """Every (tp, ep) whose replica divides the GPUs and whose ep divides the experts."""
    out = []
    for tp in TP_SIZES:
        if tp > gpus_per_node:
            continue
        out += [Parallelism(ep=ep, tp=tp) for ep in range(1, gpus // tp + 1)
                if gpus % (tp * ep) == 0 and spec.experts % ep == 0]
    return out


@dataclass(frozen=True)
class Advice:
    model: str
    gpus: int
    work: Workload
    predictions: list[Prediction]   # the layouts that fit
    rejected: list[Prediction]      # the layouts that do not
    recommended: Prediction | None
    reason: str
    calibration: Calibration


def advise(spec: ModelSpec, gpus: int, work: Workload, cal: Calibration,
           tpot_slo_ms: float | None = None) -> Advice:
    if gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {gpus}")
    preds = [predict(spec, par, work, cal) for par in layouts(spec, gpus, cal.gpus_per_node)]
    fit = [p for p in preds if p.fits]
    rejected = [p for p in preds if not p.fits]
    need = min((p.memory_gb_per_gpu * p.parallelism.gpus for p in preds), default=0.0)
    usable = cal.memory_fraction * cal.gpu_memory_gb
    if not fit:
        reason = (f"nothing fits: {spec.name} needs about {need:.0f} GB for weights and KV cache at batch "
                  f"{work.batch}, {usable:.0f} GB usable a GPU ({cal.memory_fraction:.0%} of "
                  f"{cal.gpu_memory_gb:g} GB); at least {int(-(-need // usable))} GPUs")
        return Advice(spec.name, gpus, work, [], rejected, None, reason, cal)
    pool = [p for p in fit if tpot_slo_ms is None or p.tpot_ms <= tpot_slo_ms]
    if not pool:
        best = min(fit, key=lambda p: p.tpot_ms)
        reason = (f"no layout meets TPOT {tpot_slo_ms:g} ms; the fastest that fits is "
                  f"{best.parallelism.label} at {best.tpot_ms:.1f} ms")
        return Advice(spec.name, gpus, work, fit, rejected, best, reason, cal)
    best = max(pool, key=lambda p: (round(_per_gpu(p, work), 6), -p.tpot_ms))
    reason = (f"{best.parallelism.label}: the most decode tokens/s per GPU "
              f"({_per_gpu(best, work):,.0f}) of the {len(fit)} layouts that fit"
              + ("" if tpot_slo_ms is None else f" and meet TPOT {tpot_slo_ms:g} ms"))
    return Advice(spec.name, gpus, work, fit, rejected, best, reason, cal)


def _per_gpu(p: Prediction, work: Workload) -> float:
    return p.throughput(work.batch, work.prompt)["decode_tok_s_per_gpu"]


def row(p: Prediction, work: Workload, gpus: int) -> dict[str, Any]:
    """One layout as the --json object names it."""
    d, layer = p.decode, p.decode.layer
    return {
        "ep": p.parallelism.ep, "tp": p.parallelism.tp, "layout": p.parallelism.label,
        "replicas": gpus // p.parallelism.gpus, "memory_gb_per_gpu": round(p.memory_gb_per_gpu, 1),
        "fits": p.fits,
        "a2a_us_per_layer": round(layer.a2a, 2), "a2a_latency_us_per_layer": round(layer.a2a_latency, 2),
        "a2a_bandwidth_us_per_layer": round(layer.a2a_bandwidth, 2),
        "tp_comm_us_per_layer": round(layer.tp_comm, 2),
        "weight_read_us_per_layer": round(layer.expert_read + layer.dense, 2),
        "layer_us": round(layer.total, 2), "tpot_ms": round(p.tpot_ms, 3),
        "a2a_share": round(d.layers * layer.a2a / d.total_us, 4),
        "ttft_ms": round(p.ttft_ms, 2),
        **{k: round(v, 1) for k, v in p.throughput(work.batch, work.prompt).items()},
        "notes": list(p.notes),
    }


def to_json(advice: Advice) -> dict[str, Any]:
    w, cal = advice.work, advice.calibration
    return {
        "model": advice.model, "gpus": advice.gpus, "batch": w.batch, "prompt": w.prompt,
        "output": w.output, "imbalance": w.imbalance,
        "recommended": None if advice.recommended is None else row(advice.recommended, w, advice.gpus),
        "reason": advice.reason,
        "predictions": [row(p, w, advice.gpus) for p in advice.predictions],
        "rejected": [{"ep": p.parallelism.ep, "tp": p.parallelism.tp,
                      "memory_gb_per_gpu": round(p.memory_gb_per_gpu, 1),
                      "reason": f"needs {p.memory_gb_per_gpu:.0f} GB a GPU, "
                                f"{cal.memory_fraction * cal.gpu_memory_gb:.0f} GB usable"}
                     for p in advice.rejected],
        "calibration": {"source": cal.source, "notes": list(cal.notes)},
    }


def format_text(advice: Advice) -> str:
    w = advice.work
    head = (f"{advice.model} on {advice.gpus} GPUs, batch {w.batch} per replica, prompt {w.prompt}, "
            f"output {w.output}" + (f", expert imbalance {w.imbalance:g}" if w.imbalance > 1 else ""))
    lines = [head, f"calibration: {advice.calibration.source}"]
    lines += [f"  note: {n}" for n in advice.calibration.notes]
    if advice.predictions:
        lines += ["", "| layout | replicas | GB/GPU | a2a us/layer (lat + bw) | weights us/layer | layer us "
                      "| TPOT ms | a2a share | decode tok/s/GPU | TTFT ms |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for p in advice.predictions:
            r = row(p, w, advice.gpus)
            lines.append(f"| {r['layout']} | {r['replicas']} | {r['memory_gb_per_gpu']:.0f} | "
                         f"{r['a2a_us_per_layer']:.1f} ({r['a2a_latency_us_per_layer']:.1f} + "
                         f"{r['a2a_bandwidth_us_per_layer']:.1f}) | {r['weight_read_us_per_layer']:.1f} | "
                         f"{r['layer_us']:.1f} | {r['tpot_ms']:.2f} | {r['a2a_share']:.0%} | "
                         f"{r['decode_tok_s_per_gpu']:,.0f} | {r['ttft_ms']:,.0f} |")
    for p in advice.rejected:
        lines.append(f"does not fit: {p.parallelism.label} ({p.memory_gb_per_gpu:.0f} GB a GPU)")
    notes = sorted({n for p in advice.predictions for n in p.notes})
    lines += [f"  note: {n}" for n in notes]
    label = advice.recommended.parallelism.label if advice.recommended else "none"
    lines += ["", f"recommended: {label} — {advice.reason}"]
    return "\n".join(lines)
