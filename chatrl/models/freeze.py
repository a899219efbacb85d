"""Training only the top of a transformer: `--num-layers-unfrozen N`.

The N highest transformer blocks train, with everything above them (the final norm, an untied
LM head, a reward model's value head); the embeddings and the blocks below are frozen. Autograd
then stops at the lowest trained block, so the backward pass, the gradients and the optimizer
state cover only the trained part: on a 2-core CPU that is what lets the default run's three
steps fit in minutes (trlx calls the same idea `num_layers_unfrozen`). A tied LM head shares the
embedding matrix and stays frozen with it; its input gradient still flows to the top blocks.
"""

from __future__ import annotations

import torch.nn as nn

from ..errors import ConfigError


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks: the ModuleList whose length is the config's
    layer count (llama/qwen `model.layers`, gpt2 `transformer.h`, opt `decoder.layers`, ...)."""
    cfg = getattr(model, "config", None) or getattr(getattr(model, "base_model", None), "config", None)
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0
             and len({type(b) for b in m}) == 1]
    hits = [m for m in lists if n is None or len(m) == n]
    if not hits:
        raise ConfigError(f"--num-layers-unfrozen: cannot find the transformer blocks of this "
                          f"{type(model).__name__} (no list of {n} identical blocks); use -1 (train "
                          "every layer) or LoRA (--lora-dim) for this model")
    return max(hits, key=len)


def freeze_lower_layers(model: nn.Module, n_unfrozen: int) -> tuple[int, int]:
    """Freeze all but the top `n_unfrozen` blocks (and what sits above them); -1 or a count of
    at least the number of blocks changes nothing. Returns (trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    if n_unfrozen < 0:
        return sum(p.numel() for p in model.parameters() if p.requires_grad), total
    blocks = transformer_blocks(model)
    if n_unfrozen < len(blocks):
        keep = {id(p) for b in list(blocks)[len(blocks) - n_unfrozen:] for p in b.parameters()}
        block_params = {id(p) for b in blocks for p in b.parameters()}
        # Registration order puts the embeddings (and OPT's projections) before the blocks and
        # the final norm / LM head / value head after them. Everything up to the last block is
        # frozen but the kept blocks: a trainable tensor below them would pull the backward
        # pass through every block. What comes after keeps its setting (a tied head is the
        # embedding tensor, already seen and frozen).
        seen_last_block, last = False, id(list(blocks[-1].parameters())[-1])
        for p in model.parameters():
            if not seen_last_block:
                p.requires_grad_(p.requires_grad and id(p) in keep)
                seen_last_block = id(p) == last
            elif id(p) in block_params:
                p.requires_grad_(p.requires_grad and id(p) in keep)
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


def report_trainable(model: nn.Module, n_unfrozen: int, role: str = "") -> None:
    """Freeze below the top `n_unfrozen` blocks and say what trains (when something is frozen)."""
    from ..logging import write_line

    trainable, total = freeze_lower_layers(model, n_unfrozen)
    if n_unfrozen >= 0:
        write_line(f"{role}training the top {n_unfrozen} transformer blocks and what sits above "
                   f"them: {trainable / 1e6:.1f}M of {total / 1e6:.1f}M parameters")
