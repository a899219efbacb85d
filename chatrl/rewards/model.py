"""A reward model (a `chatrl rm` folder) as a reward source: its value at each answer's last
token (the EOS), as in step 2 and PPO."""

from __future__ import annotations

import torch

from ..models.reward import gather_last

__all__ = ["RewardModelSource"]


class RewardModelSource:
    is_correctness = False
    per_sample_retry = False

    def __init__(self, model, name: str = "model"):
        self.model, self.name = model, name

    @torch.no_grad()
    def __call__(self, batch) -> torch.Tensor:
        target = next(self.model.parameters()).device
        seq, mask = batch.sequences.to(target), batch.attention_mask.to(target)
        return gather_last(self.model(seq, mask), mask).float().cpu()
