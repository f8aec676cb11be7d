"""PNG plots of `bench ep` results (matplotlib, optional: `pip install 'balancerd[lab]'`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

Rows = list[dict[str, Any]]


def _ok(rows: Rows, phase: str) -> Rows:
    return [r for r in rows if r.get("phase") == phase and "full_model_ms" in r]


def _label(r: dict[str, Any]) -> str:
    return f"EP{r['ep']}" + (" reb." if r.get("placement") == "rebalanced" else "")


def step_breakdown(plt, rows: Rows) -> bool:
    """Full-model step time split into all-to-all and the rest, per run; prefill and decode."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    drawn = False
    units = ("TTFT of the batch, ms", "TPOT, ms")
    for ax, phase, unit in zip(axes, ("prefill", "decode"), units, strict=True):
        sel = _ok(rows, phase)
        if not sel:
            ax.set_visible(False)
            continue
        drawn = True
        names = [_label(r) for r in sel]
        a2a = [r["full_model_ms"] * (r.get("a2a_share") or 0.0) for r in sel]
        rest = [r["full_model_ms"] - x for r, x in zip(sel, a2a, strict=True)]
        ax.bar(names, a2a, label="dispatch + combine")
        ax.bar(names, rest, bottom=a2a, label="everything else")
        ax.scatter(names, [r.get("predicted_full_model_ms") for r in sel], color="k", marker="_", s=400,
                   label="cost model", zorder=3)
        ax.set_title(phase)
        ax.set_ylabel(unit)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return drawn


def throughput(plt, rows: Rows) -> bool:
    """Per-GPU throughput of the full model against EP size, static and rebalanced."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    drawn = False
    for ax, phase, unit in zip(axes, ("prefill", "decode"), ("prompt tokens/s per GPU", "tokens/s per GPU"),
                               strict=True):
        for case in ("static", "rebalanced"):
            sel = sorted((r for r in _ok(rows, phase) if r.get("placement") == case), key=lambda r: r["ep"])
            if sel:
                drawn = True
                ax.plot([r["ep"] for r in sel], [r["tok_s_per_gpu_full"] for r in sel], marker="o",
                        label=case)
        ax.set_xticks(sorted({r["ep"] for r in _ok(rows, phase)}))
        ax.set_xlabel("EP size (GPUs per replica)")
        ax.set_ylabel(unit)
        ax.set_title(phase)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return drawn


def predicted_vs_measured(plt, rows: Rows) -> bool:
    """Every run's step time, cost model against measurement, with the +-25% band."""
    sel = [r for r in rows if "predicted_ms" in r]
    if not sel:
        return False
    fig, ax = plt.subplots(figsize=(5, 5))
    for phase, marker in (("prefill", "s"), ("decode", "o")):
        pts = [r for r in sel if r["phase"] == phase]
        ax.scatter([r["step_ms"] for r in pts], [r["predicted_ms"] for r in pts], marker=marker, label=phase)
        for r in pts:
            ax.annotate(_label(r), (r["step_ms"], r["predicted_ms"]), fontsize=7)
    top = max(max(r["step_ms"], r["predicted_ms"]) for r in sel) * 1.3
    low = min(min(r["step_ms"], r["predicted_ms"]) for r in sel) / 1.3
    line = [low, top]
    ax.plot(line, line, "k-", lw=0.8)
    ax.fill_between(line, [v * 0.75 for v in line], [v * 1.25 for v in line], color="grey", alpha=0.2,
                    label="within 25%")
    if top / low > 20:
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel("measured ms (reduced layers)")
    ax.set_ylabel("predicted ms")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return True


PLOTS: dict[str, Callable] = {"step_breakdown.png": step_breakdown, "throughput.png": throughput,
                              "predicted_vs_measured.png": predicted_vs_measured}


def write_all(rows: Rows, out: Path) -> tuple[list[str], str]:
    """Write every plot that has data; (file names, a note when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "No plots: matplotlib is not installed (pip install 'balancerd[lab]')."
    written = []
    for name, draw in PLOTS.items():
        try:
            if draw(plt, rows):
                plt.savefig(out / name, dpi=110)
                written.append(name)
        finally:
            plt.close("all")
    return written, ""
