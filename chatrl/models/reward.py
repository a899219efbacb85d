"""The reward model (and PPO critic): a causal-LM backbone plus a linear value head.

    values = v_head(backbone(input_ids).last_hidden_state).squeeze(-1)      [batch, seq]
    score  = values[b, last index where attention_mask[b] == 1]             [batch]

The scored token is found from the attention mask, so it is the same token in training, in
evaluation and in PPO (DeepSpeed-Chat scored different tokens in each and used pad == EOS). With
right padding it is the EOS that ends the response; with a left-padded prompt followed by a
right-padded response (PPO) it is the response's EOS, or its last token if it was cut off.

Saved as a Hugging Face folder of the backbone (loadable by AutoModel) plus `value_head.safetensors`
and `chatrl.json` {"kind": "reward_model"}; `RewardModel.from_pretrained` restores identical scores.
It also loads DeepSpeed-Chat's reward-model / critic folders (chatrl/dschat/checkpoint.py); those
score the token before the EOS, as DeepSpeed-Chat did (`score_before_token`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import ModelError
from .load import load_pretrained, model_inputs, read_meta, shared_prefix, torch_dtype, write_meta

VALUE_HEAD_FILE = "value_head.safetensors"


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position with mask 1 in each row. [batch, seq] -> [batch] (long)."""
    seq = attention_mask.shape[-1]
    positions = torch.arange(seq, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), positions, -1).max(dim=-1).values.clamp(min=0)


class RewardModel(nn.Module):
    def __init__(self, backbone: nn.Module, score_before_token: int | None = None):
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config
        # DeepSpeed-Chat's convention (its reward models were trained and used that way): when set,
        # the value at each position holding this token id (the EOS) is the value of the position
        # before it, so the score of an answer ending in EOS is read at its last real token.
        self.score_before_token = score_before_token
        # OPT-350m projects its output to word_embed_proj_dim; the embedding width is the
        # width of the last hidden state for every family we know.
        width = backbone.get_input_embeddings().embedding_dim
        self.v_head = nn.Linear(width, 1, bias=False)

    # --- Transformers-like conveniences DeepSpeed and PEFT look for
    def gradient_checkpointing_enable(self, **kw):
        self.backbone.gradient_checkpointing_enable(**kw)

    def get_input_embeddings(self):
        return self.backbone.get_input_embeddings()

    def get_output_embeddings(self):
        return None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token values [batch, seq] (fp32)."""
        out = self.backbone(**model_inputs(self.backbone, input_ids, attention_mask, position_ids),
                            use_cache=False)
        hidden = out.last_hidden_state
        values = self.v_head(hidden.to(self.v_head.weight.dtype)).squeeze(-1).float()
        if self.score_before_token is not None:
            values = value_before_token(values, input_ids, self.score_before_token)
        return values

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Reward of each sequence: the value at its last non-pad token. [batch]"""
        values = self.forward(input_ids, attention_mask)
        return gather_last(values, attention_mask)

    def shared_prompt_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                             prompt_len: int) -> torch.Tensor | None:
        """score() for rows that repeat prompts (G answers to each, prompts left-padded to
        prompt_len, answers right-padded): each distinct prompt goes forward once with a KV cache,
        indexed out to its rows, and the answers continue from it at their own positions. [batch]
        (the same scores to rounding), or None where this does not apply (no prompt repeats, a
        backbone without position ids or a plain DynamicCache, or a prompt ending in the token
        read one position back): the caller then runs score()."""
        P = prompt_len
        if not P < input_ids.shape[1] or self.training or (self.score_before_token is not None and bool(
                (input_ids[:, P - 1] == self.score_before_token).any())):
            return None
        if (shared := shared_prefix(self.backbone, input_ids, attention_mask, P)) is None:
            return None
        out, cache, rows = shared
        last_prompt = out.last_hidden_state[:, -1:][rows]  # position P - 1, each row's prompt
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, P:]
        out = self.backbone(**model_inputs(self.backbone, input_ids[:, P:], attention_mask, positions),
                            use_cache=True, **cache)
        hidden = torch.cat([last_prompt, out.last_hidden_state], dim=1)  # positions P - 1 .. T - 1
        values = self.v_head(hidden.to(self.v_head.weight.dtype)).squeeze(-1).float()
        if self.score_before_token is not None:
            values = value_before_token(values, input_ids[:, P - 1:], self.score_before_token)
        return gather_last(values, attention_mask[:, P - 1:])

    @classmethod
    def from_pretrained(cls, path: str, dtype="fp32", dropout: float | None = None,
                        tokenizer=None) -> "RewardModel":
        """Load a saved reward model, or start a new one (randomly initialised value head) from any
        causal LM."""
        from transformers import AutoModel

        from ..dschat.checkpoint import SCORE_TOKEN_KEY, end_token_id, is_dschat_reward_folder

        if is_dschat_reward_folder(path):
            from ..dschat.checkpoint import load_dschat_reward

            return load_dschat_reward(cls, path, dtype, dropout, tokenizer)
        backbone = load_pretrained(AutoModel, path, dtype, dropout, tokenizer, "reward-model backbone")
        before = read_meta(path).get(SCORE_TOKEN_KEY) == "before_eos"
        model = cls(backbone, end_token_id(tokenizer, backbone.config) if before else None)
        model = model.to(torch_dtype(dtype))
        head = Path(path) / VALUE_HEAD_FILE
        if head.exists():
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                weight = load_file(str(head))["weight"]
                model.v_head.load_state_dict({"weight": weight})
            except (SafetensorError, KeyError, RuntimeError) as e:
                raise ModelError(f"{head} ({VALUE_HEAD_FILE}) is truncated or corrupt "
                                 f"({type(e).__name__}: {e}); re-run `chatrl rm` or restore the "
                                 "file") from e
        elif read_meta(path).get("kind") == "reward_model":
            raise ModelError(f"{path} says it is a reward model but has no {VALUE_HEAD_FILE}; "
                             "the folder is incomplete (re-run `chatrl rm` or restore the file)")
        return model

    @staticmethod
    def is_reward_model(path: str) -> bool:
        from ..dschat.checkpoint import is_dschat_reward_folder

        return (Path(path) / VALUE_HEAD_FILE).exists() or is_dschat_reward_folder(path)

    def save_pretrained(self, out_dir: str | Path, state_dict: dict | None = None, **meta) -> None:
        """Backbone via save_pretrained, head as safetensors. `state_dict` (full, e.g. gathered
        from ZeRO-3) overrides the module's own tensors."""
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        if state_dict is None:
            state_dict = self.state_dict()
        backbone_sd = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
        self.backbone.save_pretrained(out_dir, state_dict=backbone_sd, safe_serialization=True)
        save_file({"weight": state_dict["v_head.weight"].detach().contiguous().cpu()},
                  str(out_dir / VALUE_HEAD_FILE))
        if self.score_before_token is not None:  # a DeepSpeed-Chat model keeps its convention
            meta["score_token"] = "before_eos"
        write_meta(out_dir, kind="reward_model", **meta)


def value_before_token(values: torch.Tensor, input_ids: torch.Tensor, token_id: int) -> torch.Tensor:
    """`values` with each position holding `token_id` given the value of the position before it
    (the first position keeps its own). [batch, seq] -> [batch, seq]"""
    previous = torch.cat([values[:, :1], values[:, :-1]], dim=1)
    return torch.where(input_ids.to(values.device) == token_id, previous, values)


def gather_last(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """values[b, last_token_index(mask)[b]] for each row. [batch, seq] -> [batch]"""
    idx = last_token_index(attention_mask)
    return values.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
