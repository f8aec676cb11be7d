"""Published model shapes and the parameter and byte counts the cost model needs (no torch).

The MoE shapes (hidden, expert intermediate, experts, top-k, MoE layers) are moe_runtime's presets
(tests/unit/test_costmodel.py checks they agree). Attention is described by its weight count per
layer and its KV-cache bytes per token and layer; `q_heads`, `kv_heads` and `head_dim` shape the
attention stand-in `bench ep` runs. For DeepSeek-V3 that stand-in is plain grouped-query attention
with MLA's cache bytes (1,152 per token and layer) and about MLA's weights (202M against 187M).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

BYTES = 2  # bf16 weights, activations and KV cache


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hidden: int
    intermediate: int          # one routed expert's intermediate size
    experts: int
    top_k: int
    moe_layers: int
    layers: int                # all transformer layers (DeepSeek-V3: 3 dense + 58 MoE)
    q_heads: int
    kv_heads: int
    head_dim: int
    attn_params: int           # attention weights of one layer
    kv_bytes_per_token: int    # KV cache of one token in one layer, bf16
    kv_shards: int             # most ways tensor parallelism splits the KV cache (KV heads; MLA: 1)
    vocab: int
    shared_intermediate: int = 0
    dense_ffn_params: int = 0  # FFN weights of the dense (non-MoE) layers, all together
    published_params: float = 0.0

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden * self.intermediate

    @property
    def moe_layer_params(self) -> int:
        """Routed experts, router and shared experts of one MoE layer."""
        return (self.experts * self.expert_params + self.experts * self.hidden
                + 3 * self.hidden * self.shared_intermediate)

    @property
    def total_params(self) -> int:
        return (self.moe_layers * self.moe_layer_params + self.layers * self.attn_params
                + self.dense_ffn_params + 2 * self.vocab * self.hidden)

    @property
    def expert_bytes(self) -> int:
        return BYTES * self.expert_params

    @property
    def step_params(self) -> int:
        """Weights read once per forward outside the MoE layers: dense layers and the LM head."""
        return ((self.layers - self.moe_layers) * self.attn_params + self.dense_ffn_params
                + self.vocab * self.hidden)

    @property
    def standin_attn_params(self) -> int:
        """Weights of the stand-in: one fused QKV projection and the output projection."""
        return self.hidden * (self.q_heads + 2 * self.kv_heads) * self.head_dim + \
            self.q_heads * self.head_dim * self.hidden

    def standin(self) -> ModelSpec:
        """What `bench ep` runs: every layer MoE, the attention stand-in's weights and cache."""
        return dataclasses.replace(self, layers=self.moe_layers, attn_params=self.standin_attn_params,
                                   kv_bytes_per_token=2 * self.kv_heads * self.head_dim * BYTES,
                                   dense_ffn_params=0)

    def tiny(self) -> ModelSpec:
        """The same routing at toy sizes (CPU checks); layer counts kept, so scaling still applies."""
        small = dataclasses.replace(self, hidden=64, intermediate=32, experts=16, top_k=4, q_heads=4,
                                    kv_heads=2, head_dim=16, vocab=512, kv_shards=2,
                                    shared_intermediate=32 if self.shared_intermediate else 0)
        return small.standin()


MODELS = {
    "qwen3-235b-a22b": ModelSpec(
        "qwen3-235b-a22b", hidden=4096, intermediate=1536, experts=128, top_k=8, moe_layers=94, layers=94,
        q_heads=64, kv_heads=4, head_dim=128, attn_params=4096 * (64 + 8) * 128 + 64 * 128 * 4096,
        kv_bytes_per_token=2 * 4 * 128 * BYTES, kv_shards=4, vocab=151936, published_params=235e9),
    "deepseek-v3": ModelSpec(
        "deepseek-v3", hidden=7168, intermediate=2048, experts=256, top_k=8, moe_layers=58, layers=61,
        q_heads=96, kv_heads=2, head_dim=144,
        # MLA: q_a, q_b, kv_a, kv_b, o
        attn_params=7168 * 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 * 128 * 256 + 128 * 128 * 7168,
        kv_bytes_per_token=576 * BYTES, kv_shards=1, vocab=129280, shared_intermediate=2048,
        dense_ffn_params=3 * 3 * 7168 * 18432, published_params=671e9),
    "mixtral-8x7b": ModelSpec(
        "mixtral-8x7b", hidden=4096, intermediate=14336, experts=8, top_k=2, moe_layers=32, layers=32,
        q_heads=32, kv_heads=8, head_dim=128, attn_params=4096 * 48 * 128 + 32 * 128 * 4096,
        kv_bytes_per_token=2 * 8 * 128 * BYTES, kv_shards=8, vocab=32000, published_params=46.7e9),
}


def model_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    return MODELS[name]
