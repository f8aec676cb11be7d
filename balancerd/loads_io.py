"""Load files in, plan files out, for offline planning (``balancerd plan``).

Loads: ``.npy`` ([L, E] or [E]), ``.json`` (an object with a "logical_count" array), or an SGLang
expert-distribution ``.pt`` dump (a dict with a "logical_count" tensor; torch is imported only to read
these). SGLang dumps may hold one [L, E] matrix per buffered step, [N, L, E]: those are summed over N,
and so is any other three-dimensional array.

Plans: ``balancerd.placement/1`` JSON (shape, slots per GPU, physical_to_logical), or SGLang's
``init_expert_location`` JSON, which is the single key "physical_to_logical_map" ([L, S]; SGLang passes
the object's keys as arguments, so no other key may appear).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from balancerd.placement import Topology

__all__ = ["PLAN_FORMAT", "LoadsError", "PlanFile", "plan_document", "read_loads", "read_plan",
           "sglang_document", "write_json"]

PLAN_FORMAT = "balancerd.placement/1"
SGLANG_KEY = "physical_to_logical_map"


class LoadsError(ValueError):
    """A load or plan file that cannot be used; the message names the file and the reason."""


def read_loads(path: str | os.PathLike) -> np.ndarray:
    """[L, E] float64 loads from a ``.npy``, ``.json`` or SGLang ``.pt`` file; finite and >= 0."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            raw = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise LoadsError(f"{path}: cannot read as .npy: {exc}") from None
    elif suffix == ".json":
        doc = _read_json(path)
        if not isinstance(doc, dict) or "logical_count" not in doc:
            raise LoadsError(f'{path}: expected a JSON object with a "logical_count" array')
        raw = doc["logical_count"]
    elif suffix == ".pt":
        raw = _read_pt(path)
    else:
        raise LoadsError(f"{path}: unknown load file type {suffix!r} (expected .npy, .json or .pt)")
    return _as_loads(raw, path)


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as exc:
        raise LoadsError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LoadsError(f"{path}: not valid JSON: {exc}") from None


def _read_pt(path: Path) -> Any:
    try:
        import torch
    except ImportError:
        raise LoadsError(f"{path}: reading an SGLang .pt dump needs torch, which is not installed here; "
                         "convert it to .npy or .json") from None
    if not path.is_file():
        raise LoadsError(f"{path}: no such file")
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises pickle, zip and runtime errors alike
        raise LoadsError(f"{path}: cannot load as a torch file: {exc}") from None
    if not isinstance(doc, dict) or "logical_count" not in doc:
        raise LoadsError(f'{path}: expected a dict with a "logical_count" tensor (an SGLang '
                         "expert-distribution dump)")
    count = doc["logical_count"]
    return count.detach().cpu().numpy() if isinstance(count, torch.Tensor) else count


def _as_loads(raw: Any, path: Path) -> np.ndarray:
    try:
        a = np.asarray(raw)
    except ValueError as exc:  # ragged nested lists
        raise LoadsError(f"{path}: loads are not a rectangular array: {exc}") from None
    if a.dtype.kind not in "iuf":
        raise LoadsError(f"{path}: loads must be numbers, got dtype {a.dtype}")
    if a.ndim == 1:
        a = a[None, :]
    elif a.ndim == 3:
        a = a.sum(axis=0, dtype=np.float64)
    elif a.ndim != 2:
        raise LoadsError(f"{path}: loads must be [E], [L, E] or [N, L, E], got shape {a.shape}")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise LoadsError(f"{path}: loads are empty (shape {a.shape})")
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        layer, expert = np.argwhere(~np.isfinite(a))[0]
        raise LoadsError(f"{path}: load of layer {layer} expert {expert} is {a[layer, expert]}")
    if (a < 0).any():
        layer, expert = np.argwhere(a < 0)[0]
        raise LoadsError(f"{path}: load of layer {layer} expert {expert} is negative ({a[layer, expert]:g})")
    return a


@dataclass(frozen=True)
class PlanFile:
    """A placement read from a plan file; ``experts`` and ``gpus`` are None for SGLang's format,
    which does not record them."""

    phys_to_log: np.ndarray   # [L, S] int32
    experts: int | None
    gpus: int | None


def read_plan(path: str | os.PathLike) -> PlanFile:
    """A placement from a ``balancerd.placement/1`` or SGLang ``physical_to_logical_map`` JSON file.
    Checks the file's own consistency; whether it fits a model is the caller's to check."""
    path = Path(path)
    doc = _read_json(path)
    if not isinstance(doc, dict):
        raise LoadsError(f"{path}: expected a JSON object")
    if SGLANG_KEY in doc and "format" not in doc:
        return PlanFile(_placement_array(doc[SGLANG_KEY], path, SGLANG_KEY), None, None)
    if doc.get("format") != PLAN_FORMAT:
        raise LoadsError(f'{path}: "format" is {doc.get("format")!r}, expected {PLAN_FORMAT!r} '
                         f'(or an SGLang file with only "{SGLANG_KEY}")')
    fields = {}
    for key in ("experts", "gpus", "slots"):
        value = doc.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LoadsError(f'{path}: "{key}" must be a positive integer, got {value!r}')
        fields[key] = value
    p2l = _placement_array(doc.get("physical_to_logical"), path, "physical_to_logical")
    if p2l.shape[1] != fields["slots"]:
        raise LoadsError(f'{path}: "physical_to_logical" rows hold {p2l.shape[1]} slots, '
                         f'"slots" says {fields["slots"]}')
    expected = Topology(fields["gpus"], fields["slots"]).slots_per_gpu.tolist()
    if doc.get("slots_per_gpu") != expected:
        raise LoadsError(f'{path}: "slots_per_gpu" is {doc.get("slots_per_gpu")!r}, expected {expected} '
                         f'for {fields["slots"]} slots on {fields["gpus"]} GPUs')
    return PlanFile(p2l, fields["experts"], fields["gpus"])


def _placement_array(raw: Any, path: Path, key: str) -> np.ndarray:
    try:
        a = np.asarray(raw)
    except ValueError:
        a = np.asarray(None)
    if a.ndim != 2 or a.dtype.kind not in "iu" or a.shape[0] < 1 or a.shape[1] < 1:
        raise LoadsError(f'{path}: "{key}" must be a non-empty [layers][slots] array of integers')
    return a.astype(np.int32)


def plan_document(phys_to_log: np.ndarray, experts: int, topo: Topology) -> dict[str, Any]:
    """The ``balancerd.placement/1`` object for a placement."""
    return {
        "format": PLAN_FORMAT,
        "experts": int(experts),
        "gpus": topo.gpus,
        "slots": topo.slots,
        "slots_per_gpu": topo.slots_per_gpu.tolist(),
        "physical_to_logical": np.asarray(phys_to_log).tolist(),
    }


def sglang_document(phys_to_log: np.ndarray) -> dict[str, Any]:
    """SGLang's ``--init-expert-location`` object for a placement."""
    return {SGLANG_KEY: np.asarray(phys_to_log).tolist()}


def _dumps(doc: dict[str, Any]) -> str:
    """JSON with one key per line and each placement row on one line (a few hundred lines, not 20k)."""
    items = []
    for key, value in doc.items():
        if isinstance(value, list) and value and isinstance(value[0], list):
            rows = ",\n".join(f"    {json.dumps(row)}" for row in value)
            items.append(f"  {json.dumps(key)}: [\n{rows}\n  ]")
        else:
            items.append(f"  {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(items) + "\n}\n"


def write_json(path: str | os.PathLike, doc: dict[str, Any]) -> None:
    """Write ``doc`` atomically: a reader sees the old file or the whole new one."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except OSError as exc:
        raise LoadsError(f"{path}: cannot write: {exc.strerror or exc}") from None
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the plan from a server running as another user
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(_dumps(doc))
        os.replace(tmp, path)
    except OSError as exc:
        os.unlink(tmp)
        raise LoadsError(f"{path}: cannot write: {exc.strerror or exc}") from None
