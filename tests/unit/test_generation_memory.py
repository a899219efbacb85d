"""What a frozen model's forwards allocate: its LM head's weight is never broadcast over rows.

generate()'s prefill (and GRPO's shared-prompt forward) asks the model for the last position's logits only (`logits_to_keep=1`), so
the LM head gets a [rows, 1, hidden] slice of the prompt's hidden states, which is not
contiguous. When no tensor of that product requires a gradient (a frozen actor head: SmolLM2's
tied embedding under --actor-num-layers-unfrozen, or any frozen model), torch's matmul does not
fold that slice into a matrix: it broadcasts the weight to [rows, hidden, vocab] and runs a
batched product, whose bf16 CPU kernel copies the broadcast weight whole (inside the kernel,
where a dispatch mode cannot see it). For the default run's rollouts (16 rows, SmolLM2-135M in
bf16) that copy was 0.9 GB and ~0.7 s per rollout. The test looks for the broadcast itself.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from chatrl.engine.hybrid import GenerationParams, hf_generate
from chatrl.steps.stages import forward_logprobs
from chatrl.models import load_causal_lm, load_tokenizer


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an op returned, views (the broadcast) included."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _rollout(model, rows=8, prompt=12, new=6):
    torch.manual_seed(0)
    ids = torch.randint(10, model.config.vocab_size, (rows, prompt))
    params = GenerationParams(max_new_tokens=new, temperature=1.0, eos_token_id=2, pad_token_id=2,
                              min_new_tokens=new)
    torch.manual_seed(1)
    with LargestTensor() as seen:
        gen = hf_generate(model, ids, torch.ones_like(ids), params, return_logprobs=True)
    return gen, seen.largest


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_a_frozen_model_rolls_out_without_copying_its_head_per_row(tiny_model_path, dtype):
    model = load_causal_lm(tiny_model_path, dtype=dtype, tokenizer=load_tokenizer(tiny_model_path))
    model.eval().requires_grad_(False)
    cfg, rows = model.config, 8
    gen, largest = _rollout(model, rows)
    # the weight broadcast over the rows is rows x hidden x vocab elements
    assert largest < rows * cfg.hidden_size * cfg.vocab_size // 2, f"a tensor of {largest} elements"
    # and the answer is what the same model gives when its head folds on its own (a weight
    # that requires a gradient makes torch fold the slice into a matrix)
    model.get_output_embeddings().weight.requires_grad_(True)
    ref, _ = _rollout(model, rows)
    assert torch.equal(gen.sequences, ref.sequences)
    torch.testing.assert_close(gen.logprobs, ref.logprobs, rtol=0, atol=0)


def test_a_frozen_reference_forwards_shared_prompts_without_copying_its_head(tiny_model_path):
    """GRPO's reference forward: G answers per prompt, each distinct prompt forwarded once with
    logits_to_keep=1 (stages.shared_prompt_logits)."""
    model = load_causal_lm(tiny_model_path, dtype="bf16", tokenizer=load_tokenizer(tiny_model_path))
    model.eval().requires_grad_(False)
    cfg, prompts, group, P, R = model.config, 4, 2, 10, 5
    torch.manual_seed(0)
    seq = torch.cat([torch.randint(10, cfg.vocab_size, (prompts, P)).repeat_interleave(group, 0),
                     torch.randint(10, cfg.vocab_size, (prompts * group, R))], 1)
    with LargestTensor() as seen:
        shared = forward_logprobs(model, seq, torch.ones_like(seq), P, 1.0, "cpu", group_size=group)
    assert seen.largest < prompts * cfg.hidden_size * cfg.vocab_size // 2, f"a tensor of {seen.largest} elements"
    full = forward_logprobs(model, seq, torch.ones_like(seq), P, 1.0, "cpu")
    torch.testing.assert_close(shared, full, rtol=0, atol=0.05)  # bf16: two orders of the sums
