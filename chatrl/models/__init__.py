"""Loading models and tokenizers (hub id, folder, GGUF, embedded default), LoRA, the reward model."""

from .load import (DEFAULT_MODEL, cache_dir, configure_tokenizer, load_causal_lm, load_config,
                   load_tokenizer, read_meta, resolve_model_path, torch_dtype, write_meta)

__all__ = ["DEFAULT_MODEL", "cache_dir", "configure_tokenizer", "load_causal_lm", "load_config",
           "load_tokenizer", "read_meta", "resolve_model_path", "torch_dtype", "write_meta"]
