"""Token log-probabilities, entropy and the SFT loss, computed memory-lean in fp32.

The logits of a causal LM are ``[batch, seq_len, vocab]``; with a 128k vocab a
full fp32 ``log_softmax`` copy is the largest tensor of a step. These
functions walk the logits in row chunks of at most ``chunk_tokens`` positions,
upcasting one chunk at a time to fp32 (fp64 stays fp64) and using the log-sum-exp trick:

    log p(y_t) = z_t[y_t] - logsumexp_v z_t[v]

so the peak extra memory is one fp32 chunk, not the whole tensor (without
autograd; with autograd the saved fp32 chunks are what backward needs).
Alignment is the caller's business: to score token ``t+1`` from the logits
at ``t`` pass ``logits[:, :-1]`` and ``ids[:, 1:]`` (see :func:`sft_loss`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from chatrl.rl.masks import masked_mean, masked_sum

__all__ = [
    "IGNORE_INDEX",
    "gather_logprobs",
    "next_token_logprobs",
    "entropy_from_logits",
    "sft_loss",
    "token_counts",
    "sequence_logprobs",
]

IGNORE_INDEX = -100

# Elements per chunk. On accelerators ~64M fp32 elements (256 MB): 512 positions of a 128k
# vocabulary, few kernel launches. On CPUs 2M (8 MB, ~42 positions of a 49k vocabulary): the
# log-sum-exp's passes over a chunk then stay in cache. Measured on a 2-core Xeon (AVX2 kernels),
# 16 x 64 positions of SmolLM2's 49k vocabulary, fp32, forward + backward of gather_logprobs:
# 615 ms in one chunk, 220 ms in chunks of 48 positions; entropy_from_logits 303 -> 109 ms.
_CHUNK_ELEMENTS = 1 << 26
_CPU_CHUNK_ELEMENTS = 1 << 21


def _chunked_rows(logits: Tensor, fn: Callable[[Tensor, int, int], Tensor], chunk_tokens: int | None) -> Tensor:
    """Apply ``fn(z_fp32 [n, V], start, end) -> [n]`` over chunks of the flattened ``[B * T, V]``
    positions (start/end index the flattened labels); reshape to ``[B, T]``.

    The chunks come from one ``split`` of the flattened logits, whose backward writes every
    chunk's gradient into one tensor. (Indexing ``logits[b, s:e]`` per row instead costs a
    full-size zero gradient per row in the backward: ~20% of a GRPO update's time.)"""
    if logits.dim() != 3:
        raise ValueError(f"logits must be [batch, seq_len, vocab]; got shape {tuple(logits.shape)}")
    batch, seq_len, vocab = logits.shape
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if batch * seq_len == 0:
        return logits.new_zeros(batch, seq_len, dtype=out_dtype)
    per_chunk = _CPU_CHUNK_ELEMENTS if logits.device.type == "cpu" else _CHUNK_ELEMENTS
    step = chunk_tokens or max(1, per_chunk // max(vocab, 1))
    flat = logits.reshape(batch * seq_len, vocab)
    parts, s = [], 0
    for z in flat.split(step):
        parts.append(fn(_upcast(z), s, s + len(z)))
        s += len(z)
    return torch.cat(parts).reshape(batch, seq_len)


def _upcast(z: Tensor) -> Tensor:
    """fp16/bf16 -> fp32; fp32 and fp64 stay as they are."""
    return z if z.dtype in (torch.float32, torch.float64) else z.float()


def gather_logprobs(logits: Tensor, labels: Tensor, chunk_tokens: int | None = None,
                    temperature: float = 1.0) -> Tensor:
    """Log-probability of each label under the logits at the same position.

    Shapes: ``logits``: ``[batch, seq_len, vocab]`` (any float dtype),
    ``labels``: ``[batch, seq_len]`` (int) -> fp32 ``[batch, seq_len]``
    (fp64 for fp64 logits; fp16/bf16 are upcast to fp32).

        logprobs[b, t] = logits[b, t, labels[b, t]] - logsumexp_v logits[b, t, v]

    Equal to ``log_softmax(logits.float(), -1).gather(-1, labels)`` without
    materialising the full fp32 log-softmax. Negative labels (the ignore
    index ``-100``) give 0. No shift is applied.

    ``temperature`` T: log-probs of softmax(logits / T), the sampling policy of a rollout. The
    division happens after the upcast: dividing bf16 logits first rounds them (a mean |delta log p|
    of ~1e-2 on a tiny Llama), so the training forward would disagree with the rollout.
    """
    inv_t = 1.0 / temperature if temperature > 0 and temperature != 1.0 else None
    if labels.shape != logits.shape[:2]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match logits shape {tuple(logits.shape)}[:2]"
        )
    ignore = labels < 0
    safe_labels = labels.clamp(min=0)

    flat_labels = safe_labels.reshape(-1)

    def one(z: Tensor, s: int, e: int) -> Tensor:
        if inv_t is not None:
            z = z * inv_t
        picked = z.gather(-1, flat_labels[s:e].unsqueeze(-1)).squeeze(-1)
        return picked - torch.logsumexp(z, dim=-1)

    return _chunked_rows(logits, one, chunk_tokens).masked_fill(ignore, 0.0)


def next_token_logprobs(logits: Tensor, labels: Tensor, chunk_tokens: int | None = None) -> Tensor:
    """Log-probability of each next token: ``logprobs[b, t] = log softmax(logits[b, t])[labels[b, t + 1]]``.

    Shapes: ``logits``: ``[batch, seq_len, vocab]``, ``labels``: ``[batch, seq_len]`` aligned
    with the input ids -> fp32 ``[batch, seq_len - 1]``; negative labels give 0.

    The same as ``gather_logprobs(logits[:, :-1], labels[:, 1:])``, but the logits are not
    sliced: a slice of them is not contiguous, so it would be copied (and its gradient
    zero-filled), a full-size copy each way. The last position gets an ignored label instead.
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return gather_logprobs(logits, targets, chunk_tokens=chunk_tokens)[:, :-1]


def entropy_from_logits(logits: Tensor, chunk_tokens: int | None = None,
                        temperature: float = 1.0) -> Tensor:
    """Entropy of the categorical distribution at each position.

    Shapes: ``logits``: ``[batch, seq_len, vocab]`` -> fp32 ``[batch, seq_len]``.

        H_t = -sum_v p_v log p_v = logsumexp(z) - sum_v softmax(z)_v * z_v

    with ``z = logits / temperature`` (divided after the fp32 upcast).
    """
    inv_t = 1.0 / temperature if temperature > 0 and temperature != 1.0 else None

    def one(z: Tensor, s: int, e: int) -> Tensor:
        if inv_t is not None:
            z = z * inv_t
        return torch.logsumexp(z, dim=-1) - (F.softmax(z, dim=-1) * z).sum(dim=-1)

    return _chunked_rows(logits, one, chunk_tokens)


def token_counts(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Number of tokens :func:`sft_loss` trains on, per row.

    Shapes: ``labels``: ``[batch, seq_len]`` -> int64 ``[batch]``.

        count_b = #{t >= 1 : labels[b, t] != ignore_index}

    (position 0 is never a target after the next-token shift). Summed over
    micro-batches it gives the denominator of an exact token-level mean under
    gradient accumulation: ``sum(sft_loss(..., reduction="sum")) / sum(counts)``.
    """
    return (labels[:, 1:] != ignore_index).sum(dim=-1)


def sft_loss(
    logits: Tensor,
    labels: Tensor,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    chunk_tokens: int | None = None,
) -> Tensor:
    """Next-token cross-entropy, 0-dim.

    Shapes: ``logits``: ``[batch, seq_len, vocab]``, ``labels``:
    ``[batch, seq_len]`` aligned with the INPUT ids (``-100`` = not trained on,
    e.g. prompt and padding). The shift is done here: the logits at ``t``
    predict ``labels[t+1]``.

        nll_t = -log softmax(logits[:, t])[labels[:, t+1]]      t = 0..T-2
        loss  = sum_{t: labels[t+1] != -100} nll_t / #counted   (reduction="mean")
        loss  = sum_{t: labels[t+1] != -100} nll_t              (reduction="sum")

    The mean is token-level over the whole batch. With no counted token the
    mean is 0 (not ``nan``).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum'; got {reduction!r}")
    targets = labels[:, 1:]
    logprobs = next_token_logprobs(logits, labels, chunk_tokens=chunk_tokens)
    counted = targets != ignore_index
    if reduction == "sum":
        return -masked_sum(logprobs, counted)
    return -masked_mean(logprobs, counted)


def sequence_logprobs(logprobs: Tensor, mask: Tensor) -> Tensor:
    """Log-probability of each whole sequence (sum over its masked tokens).

    Shapes: ``logprobs``, ``mask``: ``[batch, seq_len]`` -> ``[batch]``.

        seq_logp_b = sum_t mask[b, t] * logprobs[b, t]
    """
    return masked_sum(logprobs, mask, dim=-1)
