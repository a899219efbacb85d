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
        from ..engine.ds import is_zero3
        from ..models.load import unwrap

        target = next(self.model.parameters()).device
        seq, mask = batch.sequences.to(target), batch.attention_mask.to(target)
        model = unwrap(self.model)
        if batch.shared_prompt_len and hasattr(model, "shared_prompt_scores") and not is_zero3(self.model):
            # rows repeat prompts (G answers each): each distinct prompt goes forward once
            scores = model.shared_prompt_scores(seq, mask, batch.shared_prompt_len)
            if scores is not None:
                return scores.float().cpu()
        return gather_last(self.model(seq, mask), mask).float().cpu()
