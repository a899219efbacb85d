"""FLOP accounting for throughput logs and benchmarks.

Forward FLOPs per token ~ 2 x (parameters taking part in a matmul); forward + backward ~ 6 x.
Attention-score FLOPs (2 x seq x width per layer per token) are left out, as is usual for
model FLOP utilisation figures; at the sequence lengths used here they are a few percent.
"""

from __future__ import annotations


def matmul_params(model) -> int:
    """Parameters used in a matmul per token: all of them minus the input embedding lookup, with a
    tied LM head counted once (its matmul is real work)."""
    from ..models.load import unwrap

    base = unwrap(model)
    n = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in base.parameters())
    emb = base.get_input_embeddings()
    out = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if out is None or out.weight is not emb.weight:
        n -= emb.weight.ds_numel if hasattr(emb.weight, "ds_numel") else emb.weight.numel()
    return n


def train_flops(n_params: int, tokens: int) -> float:
    return 6.0 * n_params * tokens


def forward_flops(n_params: int, tokens: int) -> float:
    return 2.0 * n_params * tokens
