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


def train_flops_per_token(model) -> float:
    """Forward + backward matmul FLOPs per token of a training step, counting what autograd runs:
    the forward over every matmul (2N), input gradients from the top down to the lowest trained
    transformer block (2 per parameter there), weight gradients of trained matmul weights (2 per
    parameter). 6N with everything trained; less with --num-layers-unfrozen or LoRA."""
    from ..models.freeze import transformer_blocks
    from ..models.load import unwrap

    base = unwrap(model)
    n = matmul_params(base)
    emb = base.get_input_embeddings()

    def numel(p):
        return p.ds_numel if hasattr(p, "ds_numel") else p.numel()

    def ndim(p):  # ZeRO-3 keeps the full shape in ds_shape
        return len(p.ds_shape) if hasattr(p, "ds_shape") else p.ndim

    weight_grads = sum(numel(p) for p in base.parameters()
                       if p.requires_grad and ndim(p) >= 2 and p is not emb.weight)
    out = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if out is not None and out.weight is emb.weight and emb.weight.requires_grad:
        weight_grads += numel(emb.weight)  # a trained tied head: its matmul's weight gradient
    try:
        blocks = list(transformer_blocks(base))
    except Exception:  # noqa: BLE001 - an unknown layout: count the whole backward
        blocks = []
    trained = [i for i, b in enumerate(blocks) if any(p.requires_grad for p in b.parameters())]
    if not blocks or emb.weight.requires_grad or not trained:
        below = 0 if (not blocks or emb.weight.requires_grad) else sum(
            numel(p) for b in blocks for p in b.parameters())
    else:
        below = sum(numel(p) for b in blocks[:trained[0]] for p in b.parameters())
    input_grads = n - below
    return 2.0 * (n + input_grads + weight_grads)
