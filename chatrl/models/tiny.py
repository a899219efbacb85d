"""Tiny random models (2 layers, hidden 64) with a real byte-level BPE tokenizer.

Used by the test suite and the `smoke` preset: every code path of a real model (GQA attention,
chat template, EOS/pad handling, save/load) in a few hundred thousand parameters, built offline
and deterministically.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_ARCHS = ("llama", "gpt2", "opt", "qwen2", "bloom")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = """Human: Tell me about the ocean. Assistant: The ocean is wonderful, bright and full of life!
Human: What do you think of rain? Assistant: Rain is lovely, it makes gardens happy and green.
Human: Describe a mountain. Assistant: A mountain is tall, calm and beautiful in the morning sun.
The quick brown fox jumps over the lazy dog. Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation .,!?;:'"
user assistant system hello thanks great good bad terrible awful amazing happy sad nice
"""


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer (covers any text) with ChatML special tokens and no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", bos_token=None)
    fast.chat_template = CHATML_TEMPLATE
    return fast


def _config(arch: str, vocab: int, eos: int):
    from transformers import AutoConfig

    common = dict(vocab_size=vocab, eos_token_id=eos, bos_token_id=None, pad_token_id=None)
    if arch == "llama":
        return AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2,  # GQA
                                    max_position_embeddings=512, tie_word_embeddings=True, **common)
    if arch == "qwen2":
        return AutoConfig.for_model("qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=1,
                                    max_position_embeddings=512, tie_word_embeddings=False, **common)
    if arch == "gpt2":
        return AutoConfig.for_model("gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=512, **common)
    if arch == "opt":
        return AutoConfig.for_model("opt", hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=512,
                                    word_embed_proj_dim=64, **common)
    if arch == "bloom":  # ALiBi positions: no position ids, no position embeddings
        return AutoConfig.for_model("bloom", hidden_size=64, n_layer=2, n_head=4, **common)
    raise ValueError(f"unknown tiny arch {arch!r}; choose from {TINY_ARCHS}")


def make_tiny_model(out_dir: str | Path, arch: str = "llama", seed: int = 0) -> Path:
    """Write a tiny random causal LM + tokenizer to `out_dir` (reused if already there)."""
    from transformers import AutoModelForCausalLM

    from .load import atomic_dir

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    with atomic_dir(out_dir) as tmp:
        tok = build_tokenizer()
        config = _config(arch, len(tok), tok.eos_token_id)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return out_dir
