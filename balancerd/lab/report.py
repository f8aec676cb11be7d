"""`bench ep`'s outputs from its raw measurements (DIR/raw.json): the calibration file, the table with
full-model scaling and the cost model's prediction beside each measurement, plots and summary.md.

Scaling: a reduced run measures `layers` layers; the per-layer time is (step - LM head) / layers and
the full model's step is that times the preset's MoE layers plus the LM head (decode); prefill scales
with the layer count. Prediction: the cost model (balancerd.lab.costmodel, what `balancerd advise`
runs) with the calibration of the same run's separate calibration pass, given the run's shape,
EP size, dispatch mode, and two measured traffic statistics: the busiest GPU's expert load over the
mean, and the share of local expert slots a decode step reads.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from balancerd.lab import plots
from balancerd.lab.advise import advise, format_text
from balancerd.lab.calibration import Calibration, from_samples, save
from balancerd.lab.costmodel import Parallelism, Workload, predict, with_layers
from balancerd.lab.models import ModelSpec, model_spec

TOLERANCE = 0.25  # the bar: predicted step time within 25% of the measured one
COLUMNS = ["ep", "placement", "phase", "dispatch", "mode", "layers", "tokens_per_rank", "step_ms",
           "predicted_ms", "predicted_over_measured", "full_model_ms", "predicted_full_model_ms",
           "tok_s_replica_full", "tok_s_per_gpu_full", "a2a_share", "dispatch_us", "combine_us", "expert_us",
           "balancedness", "gpu_max_min", "touched_slots", "plan_moves", "plan_balancedness", "error"]


def bench_spec(meta_args: dict[str, Any]) -> ModelSpec:
    spec = model_spec(meta_args["model"])
    return spec.tiny() if meta_args.get("tiny") else spec.standin()


def calibration_of(raw: dict[str, Any]) -> Calibration:
    meta = raw["meta"]
    source = (f"bench ep calibration pass, {meta.get('gpu') or meta.get('device')}, "
              f"torch {meta.get('torch')}, {time.strftime('%Y-%m-%d', time.localtime())}")
    if meta["args"].get("tiny") or meta.get("device") != "cuda":
        source += " (toy model or CPU: not for sizing real GPUs)"
    return from_samples(raw.get("calibration", {}), source)


def enrich(row: dict[str, Any], spec: ModelSpec, cal: Calibration) -> dict[str, Any]:
    """The row with full-model scaling, throughput, the a2a share and the cost model's prediction."""
    if row.get("error") or "step_ms" not in row:
        return dict(row)
    out = dict(row)
    layers, full = row["layers"], row["full_layers"]
    step = row["step_ms"]
    if row["phase"] == "decode":
        lm = row.get("lm_head_ms", 0.0)
        out["full_model_ms"] = (step - lm) / layers * full + lm
        out["tok_s_replica_full"] = row["batch"] / out["full_model_ms"] * 1e3
        out["a2a_share"] = row.get("a2a_share_graph", row.get("a2a_share_eager"))
    else:
        out["full_model_ms"] = step / layers * full
        out["tok_s_replica_full"] = row["batch"] * row["prompt"] / out["full_model_ms"] * 1e3
        forwards_us = (row["dispatch_us"] + row["combine_us"]) * layers * row["chunks"]
        out["a2a_share"] = forwards_us / (step * 1e3)
    out["tok_s_per_gpu_full"] = out["tok_s_replica_full"] / row["ep"]
    work = Workload(row["batch"], row["prompt"], row["output"], slots_per_rank=row["slots_per_rank"],
                    imbalance=max(1.0, row.get("balancedness", 1.0)),
                    decode_mode=row["mode"] if row["phase"] == "decode" else "graph",
                    prefill_chunk=row.get("chunk_tokens"), touched=row.get("touched_slots"))
    par = Parallelism(ep=row["ep"])
    at = {n: predict(with_layers(spec, n), par, work, cal) for n in (layers, full)}
    pick = (lambda p: p.decode.total_us) if row["phase"] == "decode" else (lambda p: p.prefill.total_us)
    out["predicted_ms"] = pick(at[layers]) / 1e3
    out["predicted_full_model_ms"] = pick(at[full]) / 1e3
    out["predicted_over_measured"] = out["predicted_ms"] / step
    return out


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    keys = [c for c in COLUMNS if any(c in r for r in rows)]
    keys += sorted({k for r in rows for k in r} - set(keys))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(rows)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.4g}"
    return "" if v is None else str(v)


def table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    cols = [c for c in cols if any(r.get(c) not in (None, "") for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def check_line(rows: list[dict[str, Any]]) -> str:
    ratios = [(r["ep"], r["placement"], r["phase"], r["predicted_over_measured"]) for r in rows
              if "predicted_over_measured" in r]
    if not ratios:
        return "No measurement to compare the cost model with."
    worst = max(ratios, key=lambda x: abs(x[3] - 1))
    inside = sum(abs(x[3] - 1) <= TOLERANCE for x in ratios)
    return (f"Cost model against measurement: {inside} of {len(ratios)} runs within {TOLERANCE:.0%} "
            f"(predicted / measured from {min(x[3] for x in ratios):.2f} to {max(x[3] for x in ratios):.2f}; "
            f"worst: EP {worst[0]} {worst[1]} {worst[2]}, {worst[3]:.2f}).")


def summary(raw: dict[str, Any], rows: list[dict[str, Any]], cal: Calibration, figures: list[str],
            plot_note: str) -> str:
    meta, a = raw["meta"], raw["meta"]["args"]
    spec = bench_spec(a)
    full = model_spec(a["model"])
    lines = [
        f"# bench ep: {a['model']}, EP {', '.join(map(str, a['eps']))}",
        "",
        f"{meta.get('world')} x {meta.get('gpu') or meta.get('device')}, torch {meta.get('torch')}. "
        f"Batch {a['batch']} sequences per replica (batch / EP a rank), prompt {a['prompt']}, output "
        f"{a['output']}; router skew Zipf {a['skew']}; {a['layers']} of {full.moe_layers} MoE layers "
        f"measured, full-model figures scaled to {full.moe_layers} layers (per-layer time x layers + "
        "LM head).",
        "",
        f"Model: {'toy shapes (--tiny): ' if a.get('tiny') else ''}hidden {spec.hidden}, {spec.experts} "
        f"experts of intermediate {spec.intermediate}, top-{spec.top_k}, random weights "
        f"({'bf16' if meta.get('device') == 'cuda' else 'fp32'}). Attention is a stand-in: the real "
        f"projection weights ({spec.q_heads} query / {spec.kv_heads} KV heads of {spec.head_dim}) and "
        "attention over a random KV cache of the mean context (prompt + output / 2) at decode, causal "
        "attention over each prompt at prefill; nothing is appended to the cache and sampling is an argmax. "
        "Experts run through moe_runtime.experts.run_experts. Prefill: exact dispatch, eager, whole "
        f"sequences in chunks of up to {a['prefill_chunk']} tokens a rank. Decode: capacity dispatch "
        "(padded, no host sync), one CUDA graph per step where capture works (`mode`), else eager.",
        "",
        "All-to-all share: prefill, (dispatch + combine) / step from CUDA events; decode in a graph, the "
        "step's dispatch + combine replayed alone in a CUDA graph (`a2a_graph_us_per_layer` x layers / "
        "step); decode eager, CUDA events of an eager pass.",
        "",
        "## Measured",
        "",
        table(rows, ["ep", "placement", "phase", "mode", "tokens_per_rank", "step_ms", "full_model_ms",
                     "tok_s_replica_full", "tok_s_per_gpu_full", "a2a_share", "dispatch_us", "expert_us",
                     "combine_us", "balancedness", "gpu_max_min", "plan_moves", "error"]),
        "",
        "`step_ms`: decode, one step (TPOT) at the measured layers; prefill, the whole batch's prompts. "
        "`full_model_ms`: the same scaled to the full model (decode: TPOT; prefill: time to first token "
        "of the batch). Throughputs are of the full model: decode tokens/s, prefill prompt tokens/s. "
        "`dispatch_us`, `expert_us`, `combine_us`: per layer and forward, mean over ranks, CUDA events "
        "(decode: the eager pass). `balancedness`: busiest GPU's expert load / mean, mean over layers.",
        "",
        "## Cost model against the measurements",
        "",
        table(rows, ["ep", "placement", "phase", "step_ms", "predicted_ms", "predicted_over_measured",
                     "full_model_ms", "predicted_full_model_ms", "balancedness", "touched_slots"]),
        "",
        check_line(rows),
        "",
        f"Calibration ({cal.source}), written to calibration.json:",
        "",
        *[f"- {n}" for n in cal.notes],
        f"- fitted: {_calibration_line(cal)}",
        "",
    ]
    if figures:
        lines += ["## Plots", "", *[f"![{f}]({f})" for f in figures], ""]
    if plot_note:
        lines += [plot_note, ""]
    work = Workload(a["batch"], a["prompt"], a["output"])
    for gpus in sorted({meta.get("world", 1), 2 * meta.get("world", 1)}):
        lines += [f"## Advisor: {full.name} on {gpus} GPUs (this calibration)", "", "```",
                  format_text(advise(full, gpus, work, cal)), "```", ""]
    return "\n".join(lines)


def _calibration_line(cal: Calibration) -> str:
    def links(table) -> str:
        return ", ".join(f"{w} GPUs {x.alpha_us:.1f} us + B / {x.beta_gbps:.0f} GB/s"
                         for w, x in sorted(table.items()))

    floors = ", ".join(f"{m} {us:.0f} us/layer + {cal.floor_us_per_step[m]:.0f} us/step"
                       for m, us in cal.floor_us_per_layer.items())
    graph = f"; in graphs {links(cal.a2a_graph)}" if cal.a2a_graph else ""
    return (f"all-to-all {links(cal.a2a)}{graph}; reads {cal.dense_read_gbps:.0f} GB/s (dense), "
            f"{cal.expert_read_gbps:.0f} GB/s (experts); {cal.dense_tflops:.0f} / {cal.expert_tflops:.0f} / "
            f"{cal.sdpa_tflops:.0f} TFLOP/s (dense, experts, attention); floors {floors}")


def build_report(out: Path) -> dict[str, Any]:
    """Read DIR/raw.json; write calibration.json, ep_bench.csv, the plots and summary.md. Returns the
    enriched rows and the summary text."""
    raw = json.loads((out / "raw.json").read_text())
    cal = calibration_of(raw)
    save(cal, out / "calibration.json")
    spec = bench_spec(raw["meta"]["args"])
    rows = [enrich(r, spec, cal) for r in raw["rows"]]
    write_csv(out / "ep_bench.csv", rows)
    figures, note = plots.write_all(rows, out)
    text = summary(raw, rows, cal, figures, note)
    (out / "summary.md").write_text(text + "\n")
    return {"rows": rows, "summary": text, "calibration": dataclasses.asdict(cal)}
