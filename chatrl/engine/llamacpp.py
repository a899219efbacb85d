"""llama.cpp as the rollout backend on CPUs (`--generation-backend llamacpp`).

At a rollout's batch sizes a CPU decode step reads every weight once per token, and Transformers'
decode (one small GEMM per weight matrix through MKL/oneDNN, plus Python per layer) reads them
far below the memory bandwidth. llama.cpp's CPU kernels stream the weights at close to it: on a
2-core EPYC with AVX2 kernels, SmolLM2-135M at batch 4 decoded 99 tok/s from the same fp32
weights where Transformers did 44 (benchmarks/README.md).

How a rollout runs:
- `share(module)` (ZeRO 0-2) or `sync_weights(tensors)` (the ZeRO-3 gathered copy) writes the
  actor's current weights as a GGUF file into a private folder (/dev/shm where there is one) and
  maps it; the file is unlinked at once (the mapping keeps its pages until the model is freed).
  LoRA adapters are folded in (`merged_state_dict`); frozen tensors are converted once and kept,
  trained ones at every rollout.
- `generate` feeds each row's prompt without its padding (positions from 0, as Transformers does
  for left-padded rows), then one token per unfinished row per step, and draws every token in
  torch through `rollout_processors`: the same recorder, min_new_tokens and sampler as the
  Transformers backend, from llama.cpp's fp32 logits. Rows that have finished are not decoded.
- `recording(block)`: for the rollouts in the context, the output of that transformer block at
  every position forwarded (copied out of llama.cpp's graph by its eval callback) is kept in the
  layout the Transformers rollout records it in (chatrl.engine.trunk): the frozen trunk's output,
  which the reference forward and the training passes then replay instead of recomputing. Each
  prompt is then fed on its own (llama.cpp reorders the tokens of a multi-sequence batch).

What the rollout weights mean here (`--rollout-weights`):
- `same`: fp32 weights, fp32 KV cache, no flash attention: the sampled policy is the trained
  one (log-probs agree with a full fp32 forward to ~1e-5).
- `fp16`: every weight (trained ones too) in fp16 and an fp16 KV cache: half the bytes per token;
  the activations are rounded to fp16 too (mean log-prob gap ~0.002 nats on SmolLM2).
- `q8_0`: llama.cpp's 8-bit blocks of 32 (a quarter of the bytes); mean gap ~0.08 nats, so the
  old log-probs are recomputed by the training forward unless --recompute-old-logprobs false.

The Llama architecture family (LlamaForCausalLM: Llama 2/3, SmolLM, TinyLlama...) and Qwen2
(Qwen2ForCausalLM: Qwen2, Qwen2.5, with their q/k/v biases) convert; elsewhere
`unsupported(config)` says why and the Transformers backend is used. The llama.cpp Python bindings
are an optional dependency: `pip install llama-cpp-python` (it compiles llama.cpp, ~4 minutes on 2
cores).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import tempfile
import weakref
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ..models.load import unwrap
from ..models.lora import has_lora, merged_state_dict

KINDS = ("same", "fp16", "q8_0")
# kind -> (weight type, KV cache type, flash attention) as llama.cpp enums: GGML_TYPE_F32 = 0,
# F16 = 1; LLAMA_FLASH_ATTN_TYPE_DISABLED = 0, AUTO = -1. Flash attention on the CPU rounds
# queries and keys to fp16, so the exact kind turns it off.
_CONTEXT = {"same": (0, 0), "fp16": (1, -1), "q8_0": (1, -1)}
_MAX_SEQS = 64  # rows per llama.cpp context (its limit is 256)

# Transformers model_type -> llama.cpp architecture. Llama's rotary layout differs from
# Transformers' (q/k rows re-interleaved on conversion); Qwen2's is the same (NEOX) and its
# q/k/v projections carry biases.
_ARCH = {"llama": "llama", "qwen2": "qwen2"}
_BLOCK_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
                "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def unsupported(config, device) -> str | None:
    """Why this model cannot roll out through llama.cpp here, or None."""
    if not available():
        return "llama-cpp-python is not installed (pip install llama-cpp-python)"
    if device is not None and torch.device(device).type != "cpu":
        return "the actor is on " + str(torch.device(device).type) + ", llama.cpp serves CPU rollouts"
    arch = getattr(config, "model_type", None)
    if arch not in _ARCH:
        return f"only Llama- and Qwen2-architecture models convert (this one is {arch or '?'!r})"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        return f"rope scaling ({rope.get('rope_type', rope.get('type'))}) is not converted"
    if arch == "llama" and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)):
        return "Llama attention/MLP biases are not converted"
    if getattr(config, "use_sliding_window", False):
        return "sliding-window attention is not converted"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} is not converted"
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim * config.num_attention_heads != config.hidden_size:
        return "a head size other than hidden_size / heads is not converted"
    return None


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _interleave_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Transformers' q/k rows (rotary halves per head) -> llama.cpp's (rotary pairs adjacent)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_name(name: str, config) -> str | None:
    """The GGUF tensor name of a Transformers Llama/Qwen2 parameter (None: not written)."""
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return None if config.tie_word_embeddings else "output.weight"
    parts = name.split(".")
    if len(parts) >= 5 and parts[:2] == ["model", "layers"] and parts[-1] in ("weight", "bias"):
        sub = _BLOCK_NAMES.get(".".join(parts[3:-1]))
        if sub is not None:
            return f"blk.{parts[2]}.{sub}.{parts[-1]}"
    raise ValueError(f"llama.cpp backend: no GGUF name for parameter {name!r}")


def _convert(name: str, tensor: torch.Tensor, config, kind: str) -> tuple[np.ndarray, object]:
    """(data, raw type or None) of one tensor as written: 2-D weights in the kind's type. The
    casts run in torch (threaded; numpy's fp16 cast took 6x as long, with the same rounding)."""
    import gguf

    t = tensor.detach().to("cpu")
    if config.model_type == "llama":  # Qwen2's rotary layout is llama.cpp's already
        if name.endswith("self_attn.q_proj.weight"):
            t = _interleave_rope(t, config.num_attention_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            t = _interleave_rope(t, config.num_key_value_heads)
    if t.ndim == 2 and kind == "fp16":
        return t.to(torch.float16).contiguous().numpy(), None
    a = t.to(torch.float32).contiguous().numpy()
    if a.ndim != 2 or kind == "same":
        return a, None
    q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
    return q, gguf.GGMLQuantizationType.Q8_0


def write_gguf(path: str | os.PathLike, state: dict, config, kind: str = "same",
               cache: dict | None = None, frozen: frozenset = frozenset()) -> None:
    """Write a Llama or Qwen2 model's weights (`state`: Transformers names) as GGUF. Tensors
    named in `frozen` are converted once into `cache` and reused."""
    import gguf

    w = gguf.GGUFWriter(str(path), _ARCH[config.model_type])
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_rope_freq_base(_rope_theta(config))
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    w.add_vocab_size(config.vocab_size)
    w.add_tokenizer_model("none")  # token ids in, logits out: llama.cpp needs no tokenizer
    for name, tensor in state.items():
        g = gguf_name(name, config)
        if g is None:
            continue
        if cache is not None and name in frozen and name in cache:
            data, raw = cache[name]
        else:
            data, raw = _convert(name, tensor, config, kind)
            if cache is not None and name in frozen:
                cache[name] = (data, raw)
        if raw is None:
            w.add_tensor(g, data)
        else:
            w.add_tensor(g, data, raw_shape=data.shape, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


_LOG_CALLBACK = None


def _lib():
    """The llama_cpp bindings, initialised once, with llama.cpp's own logging silenced."""
    global _LOG_CALLBACK
    import llama_cpp as L

    if _LOG_CALLBACK is None:
        L.llama_backend_init()
        _LOG_CALLBACK = L.llama_log_callback(lambda level, text, data: None)
        L.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
    return L


_GGML = None


def _ggml():
    """libggml-base from the bindings' library folder: tensor names and reads for the eval callback."""
    global _GGML
    if _GGML is None:
        import llama_cpp.llama_cpp as LL

        g = ctypes.CDLL(str(Path(LL._base_path) / "libggml-base.so"))
        g.ggml_get_name.argtypes = [ctypes.c_void_p]
        g.ggml_get_name.restype = ctypes.c_char_p
        for fn in (g.ggml_nelements, g.ggml_nbytes):
            fn.argtypes, fn.restype = [ctypes.c_void_p], ctypes.c_int64
        g.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                              ctypes.c_size_t]
        g.ggml_backend_tensor_get.restype = None
        _GGML = g
    return _GGML


class _BlockRecorder:
    """llama.cpp's graph-eval callback: copies block `block`'s output ("l_out-<block>", fp32,
    [tokens, hidden]) at each decode call, and places its rows in a [rows, positions, hidden]
    array as `place` is told."""

    def __init__(self, block: int, hidden: int, shape: tuple[int, int, int]):
        import llama_cpp as L

        g = _ggml()
        name, self.hidden = f"l_out-{block}".encode(), hidden
        self.array = np.zeros(shape, dtype=np.float32)
        self.parts: list[np.ndarray] = []
        self.error: str | None = None

        def observe(t, ask, _user):
            if g.ggml_get_name(t) != name:
                return False if ask else True
            if ask:
                return True
            try:  # never return False here: the scheduler would skip the rest of the graph
                n = g.ggml_nelements(t)
                if g.ggml_nbytes(t) != 4 * n or n % hidden:
                    self.error = f"{name.decode()} is not an fp32 [tokens, {hidden}] tensor"
                else:
                    a = np.empty((n // hidden, hidden), dtype=np.float32)
                    g.ggml_backend_tensor_get(t, a.ctypes.data, 0, a.nbytes)
                    self.parts.append(a)
            except Exception as e:  # noqa: BLE001 - reported by place()
                self.error = repr(e)
            return True

        self.callback = L.ggml_backend_sched_eval_callback(observe)

    def place(self, rows: list[int], start: int) -> None:
        """The last decode call's states: row rows[i]'s tokens at positions start, start + 1, ...
        (one call per prompt, or one token per row)."""
        if self.error is not None:
            raise RuntimeError(f"llama.cpp backend: recording the trunk failed: {self.error}")
        got = np.concatenate(self.parts) if len(self.parts) != 1 else self.parts[0]
        self.parts = []
        if len(rows) == 1:
            self.array[rows[0], start:start + got.shape[0]] = got
        elif got.shape[0] == len(rows):
            self.array[rows, start] = got
        else:
            raise RuntimeError(f"llama.cpp backend: recorded {got.shape[0]} states for {len(rows)} rows")

    def states(self, positions: int) -> torch.Tensor:
        return torch.from_numpy(self.array[:, :positions].copy())


def _scratch_dir() -> str:
    shm = Path("/dev/shm")
    base = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
    return tempfile.mkdtemp(prefix="chatrl-llamacpp-", dir=base)


class LlamaCppBackend:
    """A `GenerationBackend` that decodes with llama.cpp (see the module docstring)."""

    merges_lora = False  # LoRA is folded into the converted copy, never into the training module

    def __init__(self, config=None, device=None, rollout_weights: str = "same"):
        if rollout_weights not in KINDS:
            raise ValueError(f"llama.cpp rollout weights must be one of {KINDS}, got {rollout_weights!r}")
        self.config = config
        self.device = device
        self.kind = rollout_weights
        self.model = None
        self._cache: dict = {}
        self._dir = None
        self._loads = 0
        self._record_block: int | None = None
        self._recorded: list = []  # per generate() call while recording: [rows, positions, H]

    @contextmanager
    def recording(self, block: int):
        """Record block `block`'s output in the rollouts of this context; `recorded()` returns it."""
        self._record_block, self._recorded = block, []
        try:
            yield self
        finally:
            self._record_block = None

    def recorded(self) -> torch.Tensor | None:
        """The states recorded by the last rollout (generate call), [rows, prompt width +
        decode steps, hidden] (zeros where a row was padding or had finished); None if none."""
        out, self._recorded = (self._recorded[-1] if self._recorded else None), []
        return out

    # -- weights
    def share(self, module) -> None:
        base = unwrap(module)
        lora = has_lora(base)
        state = merged_state_dict(base) if lora else base.state_dict()
        frozen = frozenset(n for n, p in base.named_parameters()
                           if not p.requires_grad and "lora_" not in n and ".base_layer." not in n)
        self._load(state, frozen)

    def sync_weights(self, named_tensors) -> None:
        self._load(dict(named_tensors), frozenset())

    def _load(self, state: dict, frozen: frozenset) -> None:
        L = _lib()
        self.release()
        if self._dir is None:  # removed when the backend goes, or at exit
            self._dir = _scratch_dir()
            weakref.finalize(self, shutil.rmtree, self._dir, True)
        self._loads += 1
        path = os.path.join(self._dir, f"actor-{self._loads}.gguf")
        try:
            write_gguf(path, state, self.config, self.kind, self._cache, frozen)
            params = L.llama_model_default_params()
            params.n_gpu_layers = 0
            # mapped, not copied: the file is unlinked right after (the mapping keeps its pages
            # until the model is freed), so nothing is left behind even if the run is killed later
            params.use_mmap = True
            self.model = L.llama_model_load_from_file(path.encode(), params)
        finally:
            if os.path.exists(path):
                os.remove(path)
        if not self.model:
            self.model = None
            raise RuntimeError("llama.cpp could not load the converted actor; rerun with "
                               "--generation-backend hf")

    # -- generation
    @torch.no_grad()
    def generate(self, input_ids, attention_mask, params, return_logprobs=False,
                 synced_gpus: bool = False, shared_prompts: bool = False):
        """shared_prompts is a hint this backend does not use: each row is prefilled."""
        from .hybrid import Generation, rollout_processors

        if self.model is None:
            raise RuntimeError("llama.cpp backend: generate() before share()/sync_weights()")
        rows = input_ids.shape[0]
        if rows > _MAX_SEQS:  # one context per slice of rows, answers padded to one length
            parts, states = [], []
            for i in range(0, rows, _MAX_SEQS):
                parts.append(self.generate(input_ids[i:i + _MAX_SEQS], attention_mask[i:i + _MAX_SEQS],
                                           params, return_logprobs))
                states.append(self.recorded() if self._record_block is not None else None)
            if states and all(x is not None for x in states):
                width = max(x.shape[1] for x in states)
                self._recorded = [torch.cat([torch.nn.functional.pad(x, (0, 0, 0, width - x.shape[1]))
                                             for x in states])]
            return _concat(parts, params.pad_token_id if params.pad_token_id is not None
                           else params.eos_token_id)
        recorder, processors = rollout_processors(params, input_ids, return_logprobs)
        new = self._decode(input_ids.cpu(), attention_mask.cpu(), params, processors)
        seq = torch.cat([input_ids.cpu(), new], dim=1).to(input_ids.device)
        if recorder is None:
            return Generation(seq, None)
        return Generation(seq, recorder.finish(seq), recorder.entropy(seq))

    def _decode(self, input_ids, attention_mask, params, processors) -> torch.Tensor:
        L = _lib()
        n_rows, width = input_ids.shape
        prompts = [input_ids[i][attention_mask[i].bool()].tolist() for i in range(n_rows)]
        if any(len(p) == 0 for p in prompts):
            raise ValueError("llama.cpp backend: a prompt row has no tokens")
        per_row = max(len(p) for p in prompts) + params.max_new_tokens + 1
        n_prompt = sum(len(p) for p in prompts)
        type_kv, flash = _CONTEXT[self.kind]
        rec = None
        if self._record_block is not None:
            rec = _BlockRecorder(self._record_block, self.config.hidden_size,
                                 (n_rows, width + params.max_new_tokens, self.config.hidden_size))
        cp = L.llama_context_default_params()
        cp.n_ctx = n_rows * per_row
        cp.n_batch = max(n_prompt, n_rows) if rec is None else max(max(map(len, prompts)), n_rows)
        cp.n_ubatch = min(cp.n_batch, 512)
        cp.n_seq_max = n_rows
        cp.n_threads = cp.n_threads_batch = torch.get_num_threads()
        cp.type_k = cp.type_v = type_kv
        cp.flash_attn_type = flash
        cp.no_perf = True
        if rec is not None:
            cp.cb_eval = rec.callback
        ctx = L.llama_init_from_model(self.model, cp)
        if not ctx:
            raise RuntimeError("llama.cpp backend: could not create a context "
                               f"({n_rows} rows x {per_row} positions)")
        batch = L.llama_batch_init(cp.n_batch, 0, 1)
        vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        pad = params.pad_token_id if params.pad_token_id is not None else params.eos_token_id

        def fill(tokens):  # [(row, position, token, wants logits)] -> the batch
            for n, (r, pos, tok, out) in enumerate(tokens):
                batch.token[n], batch.pos[n], batch.n_seq_id[n] = tok, pos, 1
                batch.seq_id[n][0] = r
                batch.logits[n] = int(out)
            batch.n_tokens = len(tokens)

        def decode(step, n_out):
            if L.llama_decode(ctx, batch) != 0:
                raise RuntimeError(f"llama.cpp backend: decoding failed at step {step}")
            return np.ctypeslib.as_array(L.llama_get_logits(ctx), shape=(n_out, vocab))

        try:
            rows_prompt = [[(r, pos, tok, pos == len(p) - 1) for pos, tok in enumerate(p)]
                           for r, p in enumerate(prompts)]
            if rec is None:  # every prompt in one batch
                fill([t for row in rows_prompt for t in row])
                logits = decode(0, n_rows)
            else:  # one prompt at a time: its states in order, placed after its left padding
                logits = np.empty((n_rows, vocab), dtype=np.float32)
                for r, row in enumerate(rows_prompt):
                    fill(row)
                    logits[r] = decode(0, 1)[0]
                    rec.place([r], width - len(row))
            active = list(range(n_rows))  # rows whose logits the last decode produced, in order
            seq = input_ids.clone()
            out = []
            for step in range(params.max_new_tokens):
                scores = torch.zeros(n_rows, self.config.vocab_size)
                scores[active, :vocab] = torch.from_numpy(logits)
                if vocab < scores.shape[1]:
                    scores[:, vocab:] = float("-inf")
                chosen = processors(seq, scores).argmax(-1)
                done = torch.ones(n_rows, dtype=torch.bool)
                done[active] = False
                chosen[done] = pad
                seq = torch.cat([seq, chosen[:, None]], dim=1)
                out.append(chosen)
                active = [r for r in active if params.eos_token_id is None
                          or int(chosen[r]) != params.eos_token_id]
                if not active or step == params.max_new_tokens - 1:
                    break
                fill([(r, len(prompts[r]) + step, int(chosen[r]), True) for r in active])
                logits = decode(step + 1, len(active))
                if rec is not None:
                    rec.place(active, width + step)
            if rec is not None:
                self._recorded.append(rec.states(width + len(out) - 1))
            return torch.stack(out, dim=1) if out else input_ids.new_zeros(n_rows, 0)
        finally:
            L.llama_batch_free(batch)
            L.llama_free(ctx)

    def release(self) -> None:
        if self.model is not None:
            _lib().llama_model_free(self.model)
            self.model = None

    def __del__(self):
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _concat(parts, pad):
    """One Generation from row slices (same prompt width) whose answers stopped at different
    lengths: shorter ones padded with `pad` (log-probs and entropies with 0)."""
    from .hybrid import Generation

    width = max(p.sequences.shape[1] for p in parts)

    def cat(tensors, value):
        return torch.cat([torch.nn.functional.pad(t, (0, width - w), value=value)
                          for t, w in tensors])

    seqs = cat([(p.sequences, p.sequences.shape[1]) for p in parts], pad)
    if parts[0].logprobs is None:
        return Generation(seqs, None)
    return Generation(seqs, cat([(p.logprobs, p.sequences.shape[1]) for p in parts], 0.0),
                      cat([(p.entropy, p.sequences.shape[1]) for p in parts], 0.0))
