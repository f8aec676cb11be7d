"""Permute tokens into per-rank rows for dispatch, group them by slot, and combine them back.

A row is one token sent to one destination rank, once however many of its top-k experts live
there; it carries k local slot ids (-1 where that assignment lives on another rank) and k weights.
Every function here is plain torch and makes no host sync; the public names are the dispatch
points where CUDA tensors will go to Triton kernels.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Rows(NamedTuple):
    x: torch.Tensor        # [N, H] token rows, grouped by destination rank
    token: torch.Tensor    # [N] int64 source token of each row; `tokens` marks a padding row
    slots: torch.Tensor    # [N, k] int32 local slot at the destination, -1 where not on that rank
    weights: torch.Tensor  # [N, k] float32, 0 where slots is -1


def rank_mask(dest: torch.Tensor, world: int) -> torch.Tensor:
    """[W, T] bool: token t has at least one assignment on rank w (dest is [T, k] ranks)."""
    return (dest.unsqueeze(0) == torch.arange(world, device=dest.device).view(world, 1, 1)).any(-1)


def _rows(x: torch.Tensor, rank: torch.Tensor, token: torch.Tensor, dest: torch.Tensor, local: torch.Tensor,
          weights: torch.Tensor, valid: torch.Tensor) -> Rows:
    tokens = x.shape[0]
    here = (dest[token] == rank.unsqueeze(1)) & valid.unsqueeze(1)
    slots = torch.where(here, local[token], -1).to(torch.int32)
    w = torch.where(here, weights[token], 0.0).float()
    return Rows(x[token], torch.where(valid, token, tokens), slots, w)


def pack_exact(x: torch.Tensor, dest: torch.Tensor, local: torch.Tensor, weights: torch.Tensor,
               mask: torch.Tensor, rows: int) -> Rows:
    """The `rows` (= mask.sum(), known on the host) rows of `mask`, rank by rank, tokens ascending."""
    tokens = max(x.shape[0], 1)  # with no tokens there are no rows, but keep the division defined
    flat = torch.argsort(mask.logical_not().reshape(-1).to(torch.int8), stable=True)[:rows]
    valid = torch.ones(rows, dtype=torch.bool, device=x.device)
    return _rows(x, flat // tokens, flat % tokens, dest, local, weights, valid)


def pack_capacity(x: torch.Tensor, dest: torch.Tensor, local: torch.Tensor, weights: torch.Tensor,
                  world: int, capacity: int) -> tuple[Rows, torch.Tensor]:
    """`capacity` rows per rank (padded); returns them and the assignments dropped (0-d int64).

    When a rank has more rows than `capacity`, the rows with the largest total routing weight on
    that rank are kept and the rest dropped.
    """
    tokens = x.shape[0]
    on_rank = dest.unsqueeze(0) == torch.arange(world, device=x.device).view(world, 1, 1)
    assignments, mask = on_rank.sum(-1), on_rank.any(-1)  # [W, T]
    if capacity < tokens:
        score = torch.where(mask, (on_rank * weights.unsqueeze(0)).sum(-1), -torch.inf)
        token = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :capacity]
    else:
        token = torch.arange(tokens, device=x.device).expand(world, tokens)
    kept = mask.gather(1, token)
    dropped = assignments.sum() - assignments.gather(1, token).sum()
    rank = torch.arange(world, device=x.device).repeat_interleave(token.shape[1])
    return _rows(x, rank, token.reshape(-1), dest, local, weights, kept.reshape(-1)), dropped


def slot_order(slots: torch.Tensor, slots_per_rank: int) -> torch.Tensor:
    """Flat indices into slots [R, k] sorted by slot (stable), unused (-1) entries last."""
    key = torch.where(slots < 0, slots_per_rank, slots).reshape(-1)
    return torch.argsort(key, stable=True)


def combine(y: torch.Tensor, token: torch.Tensor, tokens: int) -> torch.Tensor:
    """[tokens, H] float32: the sum of the rows `y` [N, H] of each token (padding rows dropped)."""
    out = torch.zeros((tokens + 1, y.shape[1]), dtype=torch.float32, device=y.device)
    out.index_add_(0, token, y.float())
    return out[:tokens]
