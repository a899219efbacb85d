"""DeepSpeed-Chat's model folders, read and written by chatrl.

DeepSpeed-Chat saves every model as `torch.save(module.state_dict())` in pytorch_model.bin, the
module's config.json and the tokenizer's vocabulary files (vocab.json/merges.txt or
tokenizer.model; no tokenizer_config.json):

    step 1 actor, step 3 actor and actor_ema   a causal LM with Hugging Face parameter names:
                                               `from_pretrained` reads it as it is
    step 2 reward model, step 3 critic         its RewardModel wrapper: the backbone's
                                               parameters as `rwtransformer.<name>`, the value
                                               head as `v_head.weight` [1, hidden]; config.json
                                               is the backbone's (AutoModel) config

Tokenizer. Without tokenizer_config.json the vocabulary files alone lose the special tokens,
so, as DeepSpeed-Chat did, the tokenizer comes from config.json's `_name_or_path` (the base
model's hub id or folder) when the folder has no tokenizer config of its own.

Scored token. DeepSpeed-Chat padded with EOS and read a reward model's score at the last token
*before* the first pad/EOS of the answer (`forward_value`'s chosen_end_scores, used in step 3);
chatrl reads the value at the last non-pad token, which is the EOS that ends an answer. So a
reward model loaded from DeepSpeed-Chat's layout gives the value at an EOS position the value
of the token before it (RewardModel.score_before_token): chatrl's score of an answer is then
exactly DeepSpeed-Chat's. The choice is recorded in chatrl.json ("score_token": "before_eos")
when chatrl saves such a model again, and `chatrl export --format dschat` writes
"score_token": "eos" beside a chatrl reward model, so it loads back with its own scores.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch

from ..errors import ModelError

WEIGHTS = "pytorch_model.bin"
BACKBONE_PREFIX = "rwtransformer."
HEAD_KEY = "v_head.weight"
SCORE_TOKEN_KEY = "score_token"  # in chatrl.json: "eos" (chatrl's) or "before_eos" (DeepSpeed-Chat's)
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")
# Buffers older Transformers versions saved in state dicts and newer ones no longer have.
_STALE_BUFFERS = ("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias")


def _load_state(path: Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (OSError, RuntimeError, ValueError, EOFError) as e:
        raise ModelError(f"could not read {path} as a PyTorch state dict ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]}); the file is damaged or not a "
                         "DeepSpeed-Chat checkpoint") from e


def is_dschat_reward_folder(path: str | Path) -> bool:
    """Whether `path` holds a DeepSpeed-Chat reward model / critic (rwtransformer.* + v_head)."""
    p = Path(path)
    if not (p / WEIGHTS).is_file() or (p / "value_head.safetensors").exists():
        return False
    try:  # memory-mapped: only the key names are read
        keys = _load_state(p / WEIGHTS, mmap=True).keys()
    except ModelError:  # e.g. a pre-zip-format file: not one of DeepSpeed-Chat's, let Transformers read it
        return False
    return HEAD_KEY in keys and any(k.startswith(BACKBONE_PREFIX) for k in keys)


def _skip_init():
    """A context in which Transformers builds a model without initialising its weights (all of
    them are loaded right after); a no-op where this Transformers version has no such switch."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def tokenizer_source(path: str) -> str:
    """Where the tokenizer of model folder `path` loads from: the folder itself, unless it lacks a
    tokenizer config (DeepSpeed-Chat's folders) and its config.json names the base model."""
    p = Path(path)
    if not p.is_dir() or any((p / f).exists() for f in TOKENIZER_FILES):
        return path
    try:
        base = json.loads((p / "config.json").read_text()).get("_name_or_path")
    except (OSError, json.JSONDecodeError):
        return path
    if not base or (Path(base).exists() and Path(base).resolve() == p.resolve()):
        return path
    return str(base)


def _score_before(path: str | Path, default: bool) -> bool:
    from ..models.load import read_meta

    token = read_meta(path).get(SCORE_TOKEN_KEY)
    return default if token is None else token == "before_eos"


def end_token_id(tokenizer, config) -> int | None:
    """The EOS id: the tokenizer's (what chatrl appends) or, without one, the model config's."""
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
        eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    return eos


def load_dschat_reward(cls, path: str, dtype: str = "fp32", dropout: float | None = None,
                       tokenizer=None):
    """A chatrl RewardModel (`cls`) from a DeepSpeed-Chat step-2 / critic folder."""
    from transformers import AutoModel

    from ..models.load import load_config, match_vocab, torch_dtype

    p = Path(path)
    config = load_config(path, dropout)
    state = _load_state(p / WEIGHTS)
    head = state.pop(HEAD_KEY)
    backbone_state = {k[len(BACKBONE_PREFIX):]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}
    other = sorted(k for k in state if not k.startswith(BACKBONE_PREFIX))
    if other:
        raise ModelError(f"{p / WEIGHTS}: keys {other[:3]} are neither {BACKBONE_PREFIX}* nor "
                         f"{HEAD_KEY}; this is not a DeepSpeed-Chat reward model")
    # The embedding may have more rows than the config says (DeepSpeed-Chat rounded the vocabulary
    # up to a multiple of 8 after adding tokens); build the backbone at the saved size.
    emb = next((v for k, v in backbone_state.items() if k.endswith("embed_tokens.weight")
                or k.endswith("wte.weight") or k.endswith("word_embeddings.weight")), None)
    if emb is not None and getattr(config, "vocab_size", None) != emb.shape[0]:
        config.vocab_size = emb.shape[0]
    with _skip_init():
        backbone = AutoModel.from_config(config, dtype=torch.float32)
    missing, unexpected = backbone.load_state_dict(backbone_state, strict=False)
    unexpected = [k for k in unexpected if not k.endswith(_STALE_BUFFERS)]
    missing = [k for k in missing if not k.endswith(_STALE_BUFFERS)]
    if missing or unexpected:
        raise ModelError(f"{p / WEIGHTS} does not match {type(backbone).__name__} of its config.json: "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}; the folder mixes two models")
    match_vocab(backbone, tokenizer)
    score_before = end_token_id(tokenizer, config) if _score_before(path, default=True) else None
    model = cls(backbone, score_before_token=score_before)
    with torch.no_grad():
        model.v_head.weight.copy_(head.reshape(model.v_head.weight.shape).float())
    return model.to(torch_dtype(dtype))


# ----------------------------------------------------------------------------- export

def padded_vocab(n: int) -> int:
    """DeepSpeed-Chat resizes every model's embeddings to a multiple of 8 of the tokenizer's length
    before loading a checkpoint into it, so a checkpoint must have that many rows."""
    return int(8 * math.ceil(n / 8))


def export_dschat(path: str, out_dir: str | Path) -> dict:
    """Write the chatrl model folder `path` in DeepSpeed-Chat's layout; returns what was written.

    A reward model becomes rwtransformer.* + v_head.weight; a causal LM keeps its names. The
    embeddings (and a separate LM head) are padded to a multiple of 8 rows; the tokenizer is saved
    in full, and config.json carries no `_name_or_path`, so DeepSpeed-Chat reads the tokenizer
    from the folder itself.
    """
    from ..models.load import (atomic_dir, load_causal_lm, load_tokenizer, read_meta,
                               resolve_model_path, write_meta)
    from ..models.reward import RewardModel

    src = resolve_model_path(path)
    tokenizer = load_tokenizer(src)
    reward = RewardModel.is_reward_model(src)
    model = (RewardModel.from_pretrained(src, tokenizer=tokenizer) if reward
             else load_causal_lm(src, tokenizer=tokenizer))
    backbone = model.backbone if reward else model
    rows = padded_vocab(len(tokenizer))
    if backbone.get_input_embeddings().num_embeddings < rows:
        backbone.resize_token_embeddings(rows, mean_resizing=False)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if reward:
        state = {("v_head.weight" if k == HEAD_KEY else BACKBONE_PREFIX + k[len("backbone."):]): v
                 for k, v in state.items()}
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        torch.save(state, tmp / WEIGHTS)
        config = backbone.config.to_dict()
        config.pop("_name_or_path", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tokenizer.save_pretrained(tmp)
        meta = {k: v for k, v in read_meta(src).items() if k in ("template", "step", "base_model")}
        if reward:
            meta[SCORE_TOKEN_KEY] = "before_eos" if model.score_before_token is not None else "eos"
        write_meta(tmp, kind="reward_model" if reward else "causal_lm", exported_from=src,
                   layout="dschat", **meta)
    return {"kind": "reward_model" if reward else "causal_lm", "path": str(out_dir),
            "tensors": len(state), "vocab_rows": rows}
