"""The hybrid engine: one actor, two modes — DeepSpeed training and fast generation.

Generation mode (a context manager around each rollout):
- dropout off (eval), KV cache on, no autograd;
- LoRA adapters folded into the weights, unfolded afterwards;
- under ZeRO-3 the full weights are gathered ONCE per rollout into a plain inference copy of the
  model (no DeepSpeed hooks), instead of ZeRO-3's default of gathering every layer for every
  generated token. Because that copy needs no collective while it generates, a rank that finishes
  early cannot hang the others: the only collectives are the gather before generation, which
  every rank enters in lockstep;
- caches are freed after the rollout (and the inference copy too with release_inference_cache).

Generation sits behind `GenerationBackend`: `sync_weights(named tensors)` after each update, then
`generate(...)`. The Hugging Face backend works everywhere (CPU included); a vLLM backend slots in
by implementing the same two calls.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterable, Protocol

import torch

from ..models.load import unwrap
from ..models.lora import has_lora, lora_merged, merged_state_dict


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    min_new_tokens: int = 0

    def hf_kwargs(self) -> dict:
        sample = self.temperature > 0
        kw = dict(max_new_tokens=self.max_new_tokens, do_sample=sample, use_cache=True,
                  eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
                  min_new_tokens=self.min_new_tokens or None)
        if sample:
            kw.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or None)
        else:
            kw.update(temperature=None, top_p=None, top_k=None)
        return kw


@dataclass
class Generation:
    sequences: torch.Tensor           # [batch, prompt_len + new] prompt (left-padded) + answer
    logprobs: torch.Tensor | None     # [batch, new] log p(token) under the unwarped logits, if asked


class GenerationBackend(Protocol):
    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None: ...

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 params: GenerationParams, return_logprobs: bool = False) -> Generation: ...

    def release(self) -> None: ...


def hf_generate(model, input_ids, attention_mask, params: GenerationParams,
                return_logprobs: bool = False, synced_gpus: bool = False) -> Generation:
    """Transformers generate; optionally the log-prob of each sampled token under the policy
    softmax(logits / temperature) (top-p/top-k truncation ignored, as in the training forward),
    which saves PPO a full actor forward."""
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                         return_dict_in_generate=True, output_logits=return_logprobs,
                         synced_gpus=synced_gpus, **params.hf_kwargs())
    seq = out.sequences
    logprobs = None
    if return_logprobs:
        new = seq[:, input_ids.shape[1]:]
        logits = torch.stack(out.logits, dim=1).float()           # [batch, new, vocab]
        if params.temperature > 0:
            logits = logits / params.temperature
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
    return Generation(seq, logprobs)


class HFBackend:
    """Generates with a plain Transformers module: the training module itself (ZeRO 0-2) or, under
    ZeRO-3, an inference copy that `sync_weights` fills with the gathered weights."""

    def __init__(self, model=None):
        self.model = model

    def sync_weights(self, named_tensors) -> None:
        state = self.model.state_dict()
        with torch.no_grad():
            for name, tensor in named_tensors:
                state[name].copy_(tensor)

    def generate(self, input_ids, attention_mask, params, return_logprobs=False) -> Generation:
        return hf_generate(self.model, input_ids, attention_mask, params, return_logprobs)

    def release(self) -> None:
        self.model = None


def _empty_cache() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class HybridEngine:
    """Wraps the actor's DeepSpeed engine; `generate` runs in generation mode."""

    def __init__(self, actor_engine, release_inference_cache: bool = False, gather_once: bool = True):
        self.engine = actor_engine
        self.release_inference_cache = release_inference_cache
        self.gather_once = gather_once
        self._copy = None   # inference copy under ZeRO-3

    @property
    def module(self):
        return self.engine.module

    def _zero3(self) -> bool:
        from .ds import is_zero3

        return is_zero3(self.module)

    def _inference_copy(self):
        """A plain (hook-free) module with the gathered, LoRA-merged actor weights."""
        from transformers import AutoModelForCausalLM

        from .ds import full_state_dict

        module = self.module
        state = full_state_dict(module)   # collective: one gather per rollout
        if has_lora(module):
            state = merged_state_dict(module, state)
        if self._copy is None:
            base = unwrap(module)
            dtype = next(iter(state.values())).dtype
            self._copy = AutoModelForCausalLM.from_config(base.config, dtype=dtype)
            self._copy.generation_config = base.generation_config
            self._copy.to(next(module.parameters()).device).eval()
        HFBackend(self._copy).sync_weights(state.items())
        return self._copy

    @contextmanager
    def generation_mode(self):
        """Yields a plain module ready to generate; restores training mode afterwards."""
        module = self.module
        was_training = module.training
        module.eval()
        try:
            if self._zero3() and self.gather_once:
                yield self._inference_copy()
            else:
                merge = lora_merged(module) if has_lora(module) and not self._zero3() else nullcontext()
                with merge:
                    yield module
        finally:
            if was_training:
                module.train()
            if self.release_inference_cache:
                self._copy = None
            _empty_cache()

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, params: GenerationParams,
                 return_logprobs: bool = False) -> Generation:
        with self.generation_mode() as model:
            # ZeRO-3 without gather-once: every rank must run the same number of forward steps
            # (synced_gpus) because each layer's weights are gathered collectively per token.
            synced = self._zero3() and not self.gather_once and torch.distributed.get_world_size() > 1
            return hf_generate(model, input_ids, attention_mask, params, return_logprobs, synced)
