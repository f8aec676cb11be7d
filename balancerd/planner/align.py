"""Relabelling a new placement's GPUs and slots to keep as much of the current one as possible."""

from __future__ import annotations

import numpy as np

from balancerd.placement import Topology


def align_to(new: np.ndarray, cur: np.ndarray, topo: Topology, experts: int) -> np.ndarray:
    """Relabel the GPUs of ``new`` (among GPUs with equal slot counts) and order each GPU's
    slots so that as many slots as possible keep their current expert."""
    n = new.shape[0]
    gpus, caps, first = topo.gpus, topo.slots_per_gpu, topo.first_slot
    gos = topo.gpu_of_slot
    rows = np.arange(n)[:, None]
    have_new = np.zeros((n, gpus, experts), dtype=np.float32)
    have_cur = np.zeros((n, gpus, experts), dtype=np.float32)
    have_new[rows, gos, new] = 1.0
    have_cur[rows, gos, cur] = 1.0
    overlap = have_new @ have_cur.transpose(0, 2, 1)
    overlap[:, caps[:, None] != caps[None, :]] = -1.0
    target = np.empty((n, gpus), dtype=np.int64)
    ar = np.arange(n)
    for _ in range(gpus):
        i, j = np.divmod(overlap.reshape(n, -1).argmax(axis=1), gpus)
        target[ar, i] = j
        overlap[ar, i, :] = -2.0
        overlap[ar, :, j] = -2.0
    width = int(caps.max())
    c = np.arange(width)
    valid = c < caps[:, None]
    at = np.minimum(first[:, None] + c, topo.slots - 1)
    moved_new = np.empty((n, gpus, width), dtype=np.int64)
    moved_new[rows, target] = new[:, at]
    cur_items = cur[:, at]
    same = _match_occurrences(cur_items, moved_new, valid)
    keep = same.any(axis=-1)
    used = same.any(axis=-2)
    open_slots = np.argsort(keep | ~valid, axis=-1, kind="stable")
    unused = np.argsort(used | ~valid, axis=-1, kind="stable")
    filled = cur_items.copy()
    placed = np.take_along_axis(moved_new, unused, axis=-1)
    spare = np.take_along_axis(~(used | ~valid), unused, axis=-1)
    g_idx = np.broadcast_to(np.arange(gpus)[None, :, None], spare.shape)
    r_idx = np.broadcast_to(np.arange(n)[:, None, None], spare.shape)
    filled[r_idx[spare], g_idx[spare], open_slots[spare]] = placed[spare]
    out = np.empty_like(new)
    out[:, at[valid]] = filled[:, valid]
    return out


def _match_occurrences(a: np.ndarray, b: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """[..., C, C] one-to-one matches between equal experts of a and b along the last axis:
    the k-th copy of an expert in a matches the k-th copy in b."""
    tri = np.tril(np.ones((a.shape[-1], a.shape[-1]), dtype=bool), -1)
    occ_a = ((a[..., :, None] == a[..., None, :]) & tri & valid[..., None, :]).sum(-1)
    occ_b = ((b[..., :, None] == b[..., None, :]) & tri & valid[..., None, :]).sum(-1)
    pair = (a[..., :, None] == b[..., None, :]) & (occ_a[..., :, None] == occ_b[..., None, :])
    return pair & valid[..., :, None] & valid[..., None, :]
