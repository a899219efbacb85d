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
`generate(...)`. The Hugging Face backend works everywhere (CPU included); the llama.cpp backend
(chatrl.engine.llamacpp, `--generation-backend llamacpp`) serves Llama and Qwen2 actors on CPUs;
a vLLM backend slots in by implementing the same calls.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterable, Protocol

import torch

from ..models.load import accepts_logits_to_keep, fold_head_input, shared_prefix, unwrap
from ..models.lora import has_lora, lora_merged, merged_state_dict


@dataclass(frozen=True)
class GenerationParams:
    """The whole rollout sampling policy: nothing else (in particular not the model's own
    generation_config.json) may change how tokens are drawn, or the samples would come from a
    different policy than the log-probs PPO trains on."""
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    min_new_tokens: int = 0

    def generation_config(self):
        """A `transformers.GenerationConfig` that leaves the distribution to chatrl: every knob
        that would change it is set to its neutral value (Transformers fills unset ones from the
        model's config, then from its global defaults, which include top_k=50), and decoding is
        greedy: Transformers takes the argmax of the processed scores, which `sampling_processors`
        reduce to the token they drew. min_new_tokens is left out too: `hf_generate` applies it as
        a logits processor after the log-prob recorder."""
        from transformers import GenerationConfig

        return GenerationConfig(
            max_new_tokens=self.max_new_tokens, min_length=0, do_sample=False, num_beams=1,
            use_cache=True, eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
            typical_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0, epsilon_cutoff=0.0,
            eta_cutoff=0.0, renormalize_logits=False, return_dict_in_generate=True)

    def sampling_processors(self) -> list:
        """The logits processors that draw each token from softmax(logits / T) truncated by
        top-k / top-p, in Transformers' own order (temperature, top-k, top-p), ending with
        `InverseCDFSampler`. Empty for greedy decoding (temperature 0)."""
        if self.temperature <= 0:
            return []
        from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                            TopPLogitsWarper)

        out = [TemperatureLogitsWarper(self.temperature)] if self.temperature != 1.0 else []
        if self.top_k:
            out.append(TopKLogitsWarper(self.top_k))
        if self.top_p < 1.0:
            out.append(TopPLogitsWarper(self.top_p))
        return out + [InverseCDFSampler()]


@dataclass
class Generation:
    sequences: torch.Tensor           # [batch, prompt_len + new] prompt (left-padded) + answer
    logprobs: torch.Tensor | None     # [batch, new] log p(token) under the unwarped logits, if asked
    entropy: torch.Tensor | None = None  # [batch, new] entropy of each step's distribution, with logprobs


class GenerationBackend(Protocol):
    # Whether the engine folds LoRA adapters into the weights for a rollout (ZeRO 0-2); False:
    # the backend runs them unmerged (fp16 rollout copies of the frozen base layers).
    merges_lora: bool

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None: ...

    # shared_prompts: rows may repeat a prompt (G answers each); a backend may then compute
    # each distinct prompt once (a hint: the result is the same either way)
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 params: GenerationParams, return_logprobs: bool = False,
                 synced_gpus: bool = False, shared_prompts: bool = False) -> Generation: ...

    def release(self) -> None: ...


class InverseCDFSampler:
    """The last logits processor of a sampled rollout: draws one token per row from
    softmax(scores) by inverse-CDF sampling and returns scores that are 0 at the drawn token and
    -inf elsewhere, so Transformers' greedy step (argmax) emits it.

    The same distribution as Transformers' sampling step, faster: `torch.multinomial` on CPU
    draws an exponential variate for every vocabulary entry, 5 ms per step at batch 4 and 19 ms
    at batch 16 (SmolLM2's 49k vocabulary, 2 AVX2 threads), more than the rest of the step apart
    from the model; one uniform per row against the cumulative sum takes 0.1-0.3 ms. The sum
    runs in fp64, so tokens far below fp32's resolution near 1 keep their probability. Tokens
    of probability 0 (truncated by top-k/top-p) are never drawn: the first entry of the
    cumulative sum above u cannot be one that adds nothing. Uses torch's default generator of
    the scores' device, so torch.manual_seed makes rollouts reproducible."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        cdf = torch.softmax(scores.float(), dim=-1).double().cumsum_(-1)
        u = torch.rand(scores.shape[0], 1, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]
        tokens = torch.searchsorted(cdf, u, right=True).clamp_(max=scores.shape[-1] - 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, tokens, 0.0)


class LogprobRecorder:
    """A logits processor that records log p(sampled token) under softmax(fp32 logits / T), and
    the entropy of that distribution at every step (the rollout log shows it per token).

    Placed first, it sees each step's raw logits (Transformers hands processors an fp32 copy). It
    keeps that step's log-softmax [batch, vocab] until the next call, whose input_ids end with the
    token just sampled, gathers that token's entry and drops the rest: one step's distribution is
    alive at a time, never the [batch, new, vocab] stack of every step's logits.
    """

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.pending: torch.Tensor | None = None
        self.logprobs: list[torch.Tensor] = []
        self.entropies: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.pending is not None:
            self._gather(input_ids[:, -1])
        z = scores.float()  # upcast before dividing by the temperature, as the training forward
        if self.temperature > 0:
            z = z / self.temperature
        self.pending = logp = torch.log_softmax(z, dim=-1)
        self.entropies.append(-(logp.exp() * logp).nansum(-1))  # 0 x -inf (masked logits): 0
        return scores

    def _gather(self, tokens: torch.Tensor) -> None:
        self.logprobs.append(self.pending.gather(-1, tokens.unsqueeze(-1)).squeeze(-1))
        self.pending = None

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """[batch, new] log-probs; the last step's token is the last column of `sequences`."""
        if self.pending is not None:
            self._gather(sequences[:, -1])
        if not self.logprobs:
            return torch.zeros(sequences.shape[0], 0, device=sequences.device)
        return torch.stack(self.logprobs, dim=1)

    def entropy(self, sequences: torch.Tensor) -> torch.Tensor:
        """[batch, new] entropies, aligned with finish()'s log-probs."""
        if not self.entropies:
            return torch.zeros(sequences.shape[0], 0, device=sequences.device)
        return torch.stack(self.entropies, dim=1)


@contextmanager
def _own_generation_config(model, config):
    """generate() fills every unset field from `model.generation_config` (its
    generation_config.json): for the duration, the model's config is ours."""
    saved = getattr(model, "generation_config", None)
    model.generation_config = config
    try:
        yield
    finally:
        model.generation_config = saved


def rollout_processors(params: GenerationParams, input_ids: torch.Tensor, return_logprobs: bool):
    """(recorder or None, the logits processors of one rollout): the log-prob recorder first (it
    sees the raw logits), then min_new_tokens, then `params.sampling_processors()`. Every
    backend draws its tokens through these, so the distribution is the same code everywhere."""
    from transformers import LogitsProcessorList
    from transformers.generation.logits_process import MinNewTokensLengthLogitsProcessor

    recorder = LogprobRecorder(params.temperature) if return_logprobs else None
    processors = LogitsProcessorList([recorder] if recorder is not None else [])
    if params.min_new_tokens and params.eos_token_id is not None:
        processors.append(MinNewTokensLengthLogitsProcessor(
            input_ids.shape[1], params.min_new_tokens, params.eos_token_id, device=input_ids.device))
    processors.extend(params.sampling_processors())
    return recorder, processors


def hf_generate(model, input_ids, attention_mask, params: GenerationParams,
                return_logprobs: bool = False, synced_gpus: bool = False,
                shared_prompts: bool = False) -> Generation:
    """Transformers generate under `params` alone; optionally the log-prob of each sampled token
    under the policy softmax(logits / temperature) (top-p/top-k truncation and min_new_tokens
    ignored, as in the training forward), which saves PPO a full actor forward.

    shared_prompts: rows may repeat a prompt (GRPO/RLOO's G answers); each distinct prompt is
    prefilled once (models.load.shared_prefix): a prefill is compute-bound, so at 4 prompts x 4
    answers it costs a quarter. Not with synced_gpus (ZeRO-3 gathering per forward: every
    rank must run the same forwards)."""
    config = params.generation_config()
    recorder, processors = rollout_processors(params, input_ids, return_logprobs)
    fold_head_input(model)  # load_causal_lm did this already; models built elsewhere (API users)
    with _own_generation_config(model, config):
        # the first P - 1 prompt tokens of each distinct prompt once; generate() forwards each
        # row's last prompt token from that cache, then decodes
        shared = shared_prefix(model, input_ids, attention_mask, input_ids.shape[1] - 1,
                               **({"logits_to_keep": 1} if accepts_logits_to_keep(model) else {})) \
            if shared_prompts and not synced_gpus else None
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                             generation_config=config, logits_processor=processors,
                             synced_gpus=synced_gpus, **(shared[1] if shared else {}))
    seq = out.sequences
    if recorder is None:
        return Generation(seq, None)
    return Generation(seq, recorder.finish(seq), recorder.entropy(seq))


class HFBackend:
    """Generates with a plain Transformers module.

    `share(module)`: generate with the training module itself (ZeRO 0-2: its weights are whole
    on every rank, so nothing is copied). `sync_weights(named tensors)`: build (once) a hook-free
    inference copy and load the given full weights into it — the ZeRO-3 path, and the contract a
    vLLM backend implements the same way.
    """

    def __init__(self, config=None, device=None, rollout_weights: str = "same"):
        self.config = config
        self.device = device
        self.model = None
        self._shared = False
        self.weights = None
        self.merges_lora = rollout_weights != "fp16"
        if rollout_weights == "fp16":
            from .rollout_weights import Fp16RolloutWeights

            self.weights = Fp16RolloutWeights()

    def share(self, module) -> None:
        self.model, self._shared = module, True

    def sync_weights(self, named_tensors) -> None:
        named_tensors = dict(named_tensors)
        built = self.model is None or self._shared
        if built:
            from transformers import AutoModelForCausalLM

            dtype = next(iter(named_tensors.values())).dtype
            with _no_init():  # every weight is overwritten below: skip the random init (~2 s)
                self.model = AutoModelForCausalLM.from_config(self.config, dtype=dtype)
            self.model.to(self.device).eval()
            self._shared = False
        state = self.model.state_dict()
        with torch.no_grad():
            for name, tensor in named_tensors.items():
                state[name].copy_(tensor)
        if built:  # uninitialised memory must not survive: every parameter (or its tie) was loaded
            loaded = {state[n].data_ptr() for n in named_tensors}
            unset = [n for n, p in self.model.named_parameters()
                     if n not in named_tensors and p.data_ptr() not in loaded]
            if unset:
                raise ValueError(f"sync_weights got no tensor for {unset[:5]} ({len(unset)} parameters)")

    def generate(self, input_ids, attention_mask, params, return_logprobs=False,
                 synced_gpus: bool = False, shared_prompts: bool = False) -> Generation:
        with self.weights.applied(self.model) if self.weights is not None else nullcontext():
            return hf_generate(self.model, input_ids, attention_mask, params, return_logprobs,
                               synced_gpus, shared_prompts)

    def release(self) -> None:
        self.model, self._shared = None, False


def _llamacpp_backend(*args, **kwargs):
    from .llamacpp import LlamaCppBackend

    return LlamaCppBackend(*args, **kwargs)


BACKENDS = {"hf": HFBackend, "llamacpp": _llamacpp_backend}


def _no_init():
    """Transformers' switch that skips weight initialisation (a no-op where it is missing)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older/newer Transformers layouts
        return nullcontext()
    return no_init_weights()


def _empty_cache(collect: bool) -> None:
    """Hand the rollout's KV cache back to the device allocator. A full gc.collect() costs ~0.3 s
    per rollout on CPU, so it only runs when a large object was just released."""
    if collect:
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class HybridEngine:
    """Wraps the actor's DeepSpeed engine; `generate` runs in generation mode."""

    def __init__(self, actor_engine, release_inference_cache: bool = False, gather_once: bool = True,
                 backend: str = "hf", rollout_weights: str = "same"):
        self.engine = actor_engine
        self.backend_name = backend
        self.rollout_weights = rollout_weights
        self.release_inference_cache = release_inference_cache
        self.gather_once = gather_once
        base = unwrap(actor_engine.module)
        self.backend = BACKENDS[backend](base.config, next(actor_engine.module.parameters()).device,
                                         rollout_weights=rollout_weights)

    @property
    def module(self):
        return self.engine.module

    def _zero3(self) -> bool:
        from .ds import is_zero3

        return is_zero3(self.module)

    def _sync_gathered(self) -> None:
        """Gather the full weights once (collective), fold LoRA in, load them into the backend."""
        from .ds import full_state_dict

        state = full_state_dict(self.module)
        if has_lora(self.module):
            state = merged_state_dict(self.module, state)
        self.backend.sync_weights(state.items())

    @contextmanager
    def generation_mode(self):
        """Yields the backend, ready to generate; restores training mode afterwards."""
        module = self.module
        was_training = module.training
        module.eval()
        try:
            if self._zero3() and self.gather_once:
                self._sync_gathered()
                yield self.backend
            else:
                # Weights are whole on this rank (or ZeRO-3 gathers per layer, per token).
                # LoRA stays unmerged under --rollout-weights fp16: the frozen base layers keep
                # the fp16 copies packed at the first rollout, the small adapters run beside them.
                merge = (lora_merged(module) if has_lora(module) and not self._zero3()
                         and self.backend.merges_lora else nullcontext())
                with merge:
                    self.backend.share(module)
                    yield self.backend
                self.backend.release()
        finally:
            if was_training:
                module.train()
            if self.release_inference_cache:
                self.backend.release()
            _empty_cache(collect=self.release_inference_cache)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, params: GenerationParams,
                 return_logprobs: bool = False, shared_prompts: bool = False) -> Generation:
        """shared_prompts: rows repeat prompts (G answers each), which a backend may prefill once."""
        # ZeRO-3 without gather-once: every rank must run the same number of forward steps
        # (synced_gpus) because each layer's weights are gathered collectively per token.
        synced = (self._zero3() and not self.gather_once and torch.distributed.is_initialized()
                  and torch.distributed.get_world_size() > 1)
        with self.generation_mode() as backend:
            return backend.generate(input_ids, attention_mask, params, return_logprobs, synced,
                                    shared_prompts=shared_prompts)
