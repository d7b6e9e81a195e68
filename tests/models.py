"""Small synthetic models for tests, made with numpy so the bytes never depend on the CPU.

``torch.randn`` depends on the instruction set (DESIGN section 4), so test inputs are drawn from
numpy's PCG64 generator and converted; the same seed gives the same bytes everywhere.
"""

from __future__ import annotations

import numpy as np
import torch

#: a tiny Llama-like layout: name -> shape
TINY_LAYOUT: dict[str, tuple[int, ...]] = {
    "model.embed_tokens.weight": (32, 16),
    "model.layers.0.self_attn.q_proj.weight": (16, 16),
    "model.layers.0.mlp.up_proj.weight": (24, 16),
    "model.layers.0.input_layernorm.weight": (16,),
    "model.layers.1.self_attn.q_proj.weight": (16, 16),
    "model.layers.1.mlp.up_proj.weight": (24, 16),
    "model.layers.1.input_layernorm.weight": (16,),
    "model.norm.weight": (16,),
    "lm_head.weight": (32, 16),
}


def randn(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    rng = np.random.Generator(np.random.PCG64(seed))
    arr = rng.standard_normal(size=shape, dtype=np.float32)
    return torch.from_numpy(arr).to(dtype)


def make_model(
    seed: int,
    layout: dict[str, tuple[int, ...]] | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """A model whose every tensor is N(0, 1) noise from ``seed``."""
    layout = TINY_LAYOUT if layout is None else layout
    return {
        name: randn(shape, seed * 1000 + i, dtype)
        for i, (name, shape) in enumerate(sorted(layout.items()))
    }


def make_finetune(
    base: dict[str, torch.Tensor], seed: int, scale: float = 0.01, shared: float = 0.5
) -> dict[str, torch.Tensor]:
    """``base + scale * (shared * common_noise + own_noise)``, computed in float32."""
    out = {}
    for i, (name, t) in enumerate(sorted(base.items())):
        common = randn(tuple(t.shape), 10_000_000 + i)
        own = randn(tuple(t.shape), seed * 7919 + i)
        out[name] = (t.float() + scale * (shared * common + own)).to(t.dtype)
    return out
