"""Sharing the frozen trunk: compute the frozen lower blocks once per rollout, not once per pass.

With `--actor-num-layers-unfrozen N` the actor's embeddings and lower blocks never change, and
they hold the same weights as the reference model's (both start from the SFT model). So the
reference forward of scoring has already computed, for every rollout token, the hidden states
the actor's frozen part would compute again in each PPO epoch's training forward. Likewise the
critic's frozen part computes the same hidden states in the scoring forward (old values) and
in every training forward. `TrunkShare` records the output of the last frozen block in the first
pass (a forward hook) and lets the later passes start at the first trained block: each skipped
block returns the recorded output, so the model's own forward runs unchanged around them
(embeddings, masks, position embeddings, the trained blocks, the head).

It applies only where the result is the same computation: the frozen part of the trained model
is bit-for-bit the twin's (checked once), nothing in it is random (no dropout), the weights are
whole on the rank (not ZeRO-3), no LoRA, no gradient checkpointing, and each later pass sees the
same rows and positions (an Experience carries the recorded states and `select` slices them with
the rows it keeps). Where a pass's shape does not match, the blocks run as usual.

An fp32 actor that decodes with its own weights computes its trunk's output during the rollout
(the prompt, then one position per decode step; a KV-cached decode agrees with a full forward to
~1e-6): `capture_steps` records it there, and the reference forward replays it as well
(chatrl.steps.ppo.PPOTrainer.make_experience). The llama.cpp rollout backend hands over the same
states from its own graph (`capture_rollout`; see rollout_records_trunk for its weight kinds).

Where the states come from a twin (the reference or reward model), the twin's frozen parameters
then point at the trained model's tensors: equal and never updated, they are kept once in memory
(about 0.4 GB per pair for SmolLM2-135M in fp32 with 22 of 30 blocks frozen).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from ..models.freeze import transformer_blocks
from ..models.load import unwrap

_DROPOUT_KEYS = ("dropout", "pdrop", "drop_prob", "dropout_prob", "dropout_rate")


def _frozen_region(model: nn.Module, cut: int) -> list[tuple[str, torch.Tensor]]:
    """Every parameter (and buffer) registered before block `cut`: the frozen trunk."""
    blocks = transformer_blocks(model)
    first_trained = {id(p) for p in blocks[cut].parameters()} if cut < len(blocks) else set()
    out = []
    for name, p in model.named_parameters():
        if id(p) in first_trained:
            break
        out.append((name, p))
    return out


def frozen_cut(model: nn.Module) -> int:
    """How many leading transformer blocks are frozen along with everything registered before
    them (0: none)."""
    try:
        blocks = transformer_blocks(model)
    except Exception:  # no block list: nothing to share
        return 0
    cut = 0
    for block in blocks:
        if any(p.requires_grad for p in block.parameters()):
            break
        cut += 1
    if cut == 0 or cut == len(blocks):
        return 0
    if any(p.requires_grad for _, p in _frozen_region(model, cut)):
        return 0
    return cut


def _has_dropout(model: nn.Module) -> bool:
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
        return True
    cfg = getattr(model, "config", None)
    for key, value in (vars(cfg).items() if cfg is not None else ()):
        if any(k in key for k in _DROPOUT_KEYS) and isinstance(value, float) and value > 0:
            return True
    return False


def why_not_shared(trained: nn.Module, twin: nn.Module | None = None) -> str | None:
    """None where sharing applies to `trained` (and `twin`, the frozen model the states come
    from, if not the trained one itself); else the reason, for the log."""
    from ..models.lora import has_lora
    from .ds import is_zero3

    if is_zero3(trained) or (twin is not None and is_zero3(twin)):
        return "ZeRO-3 partitions the weights"
    model = unwrap(trained)
    if has_lora(model):
        return "LoRA"
    if any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
        return "gradient checkpointing"
    cut = frozen_cut(model)
    if cut == 0:
        return "no frozen lower blocks"
    if _has_dropout(model) or (twin is not None and _has_dropout(unwrap(twin))):
        return "dropout"
    if twin is not None:
        mine, theirs = _frozen_region(model, cut), dict(unwrap(twin).named_parameters())
        for name, p in mine:
            q = theirs.get(name)
            if q is None or q.shape != p.shape or q.dtype != p.dtype or \
                    not torch.equal(q.detach().to(p.device), p.detach()):
                return f"the frozen weights differ from the twin's ({name})"
    return None


def rollout_records_trunk(dtype: str, rollout_weights: str, backend: str = "hf") -> bool:
    """Whether the actor's rollout computes its frozen trunk as the reference forward would, so
    the reference can replay it: an fp32 actor decoding with its own weights in Transformers (a
    KV-cached decode agrees with a full forward to ~1e-6), or through llama.cpp with fp32 (`same`,
    ~1e-5) or fp16 weights. With llama.cpp's fp16 the replayed states carry its rounding (relative
    ~1e-3): the reference and the training passes then see the trunk as the rollout saw it, so the
    policy trained is the one sampled below the trained blocks. Not with Transformers' fp16 rollout
    copies (fp32 prompt, fp16 decode), bf16, or llama.cpp's q8_0 (~0.07 nats from the policy)."""
    if dtype != "fp32":
        return False
    return rollout_weights == "same" if backend == "hf" else \
        backend == "llamacpp" and rollout_weights in ("same", "fp16")


def _blocks_return_tensors() -> bool:
    """Transformers 5's decoder blocks return their hidden states as a tensor (4's: a tuple)."""
    import transformers

    return int(transformers.__version__.split(".")[0]) >= 5


@contextmanager
def _hooked(block, hook):
    """`hook` as a forward hook of `block` for the length of the context."""
    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class TrunkShare:
    """Records the frozen trunk's output in one pass and replays it in later passes.

    capture(module): a context in which a forward of `module` (the trained model or its twin)
    records the output of block cut - 1; `taken()` returns it (and forgets it).
    reuse(module, hidden): a context in which a forward of the trained model whose input has
    hidden's [batch, length] starts at block `cut`.
    """

    def __init__(self, cut: int, role: str, twin=None):
        self.cut, self.role = cut, role
        self.twin = twin  # the frozen model whose forward records the states (None: the trained one)
        self._form: int | None = None  # -1: the block returns a tensor; n: a tuple of n
        self._taken: torch.Tensor | None = None

    def skipped_params(self, module) -> int:
        """Matmul parameters of the skipped blocks: a replayed pass runs 2 x this fewer FLOPs
        per token."""
        return sum(p.numel() for b in list(transformer_blocks(unwrap(module)))[:self.cut]
                   for p in b.parameters() if p.dim() >= 2)

    @contextmanager
    def capture(self, module):
        block = transformer_blocks(unwrap(module))[self.cut - 1]

        def hook(_mod, _args, output):
            if isinstance(output, torch.Tensor):
                self._form, self._taken = -1, output.detach()
            elif isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
                # (hidden, attention weights or cache): the model reads the rest only when it
                # asked for attentions or a cache, and then the replay runs the blocks instead
                self._form, self._taken = len(output), output[0].detach()
            else:
                self._taken = None

        self._taken = None
        with _hooked(block, hook):
            yield self

    @contextmanager
    def capture_steps(self, module):
        """A context in which each forward of `module` (a KV-cached generation with the trained
        model itself: the prompt, then one position per decode step) appends block cut - 1's
        output; `taken()` then returns them joined, [batch, positions forwarded, hidden]. Only
        for blocks that return a tensor (Transformers 5): else nothing is recorded."""
        block = transformer_blocks(unwrap(module))[self.cut - 1]
        parts: list = []

        def hook(_mod, _args, output):
            parts.append(output.detach() if isinstance(output, torch.Tensor) else None)

        self._taken = None
        with _hooked(block, hook):
            yield self
        if parts and all(p is not None and p.shape[0] == parts[0].shape[0] for p in parts):
            self._form, self._taken = -1, torch.cat(parts, dim=1)

    @contextmanager
    def capture_rollout(self, hybrid, module):
        """capture_steps for the rollout `hybrid` runs: a backend that records a block itself
        (llama.cpp: `recording(block)`) is asked to; else `module`'s forward hooks record it."""
        backend = getattr(hybrid, "backend", None)
        if not hasattr(backend, "recording"):
            with self.capture_steps(module):
                yield self
            return
        self._taken = None
        with backend.recording(self.cut - 1):
            yield self
        states = backend.recorded()
        if states is not None and _blocks_return_tensors():
            self._form, self._taken = -1, states

    def taken(self) -> torch.Tensor | None:
        out, self._taken = self._taken, None
        return out

    @contextmanager
    def reuse(self, module, hidden: torch.Tensor | None):
        if hidden is None or self._form is None:
            yield
            return
        blocks = list(transformer_blocks(unwrap(module)))[:self.cut]
        form = self._form

        def skipped(block):
            original = block.forward

            def forward(hidden_states=None, *args, **kwargs):
                h = hidden_states if hidden_states is not None else kwargs.get("hidden_states")
                if h is None or h.shape[:2] != hidden.shape[:2] or kwargs.get("use_cache") or \
                        kwargs.get("output_attentions"):
                    return original(hidden_states, *args, **kwargs)
                out = hidden.to(device=h.device, dtype=h.dtype)
                return out if form < 0 else (out,) + (None,) * (form - 1)
            return forward

        for b in blocks:
            b.forward = skipped(b)
        try:
            yield
        finally:
            for b in blocks:
                del b.forward  # the instance attribute: the class's forward again


def share_frozen_weights(trained, twin, cut: int) -> int:
    """Point the twin's frozen-trunk parameters at the trained model's tensors, which hold the
    same values (checked by why_not_shared) and are never updated: one copy in memory instead of
    two. Returns the bytes the twin gave up (0 where the devices or dtypes differ, e.g. an
    offloaded reference model)."""
    mine = _frozen_region(unwrap(trained), cut)
    theirs = dict(unwrap(twin).named_parameters())
    if any(theirs[n].device != p.device or theirs[n].dtype != p.dtype for n, p in mine):
        return 0
    freed = 0
    with torch.no_grad():
        for name, p in mine:
            q = theirs[name]
            if q.data_ptr() != p.data_ptr():
                freed += q.numel() * q.element_size()
                q.data = p.data
    return freed


def trunk_shares(models, group_size: int = 1) -> dict[str, TrunkShare]:
    """The shares that apply to an RLHFModels bundle: "actor", recorded in the reference forward,
    and "critic", recorded in the reward model's forward where its frozen part is the critic's
    (the critic's scoring forward then replays it too), else in the critic's own scoring forward.
    The log says which, or why not.

    group_size > 1 (G answers per prompt): none are recorded, since those passes forward each
    distinct prompt once instead (stages.shared_prompt_logits); the frozen weights are still
    kept once."""
    from ..logging import write_line

    shares = {}
    candidates = {"actor": [models.ref] if models.ref is not None else [],
                  "critic": ([models.reward] if models.reward is not None else []) + [None]}
    for role, trained in (("actor", models.actor), ("critic", models.critic)):
        cut = frozen_cut(unwrap(trained.module)) if trained is not None else 0
        if cut == 0:
            continue
        reasons = []
        for twin in candidates[role]:
            reason = why_not_shared(trained.module, twin)
            if reason is None:
                shares[role] = TrunkShare(cut, role, twin)
                source = {"actor": "the reference model's", "critic": "the reward model's"}[role] \
                    if twin is not None else "its own scoring"
                freed = share_frozen_weights(trained.module, twin, cut) if twin is not None else 0
                kept = f"; one copy of their weights in memory ({freed / 1e6:.0f} MB freed)" if freed else ""
                if group_size > 1:
                    del shares[role]
                    write_line(f"{role}: the {cut} frozen lower blocks are computed in every pass "
                               f"({group_size} answers per prompt: each prompt goes forward once "
                               f"instead){kept}")
                    break
                write_line(f"{role}: the {cut} frozen lower blocks run once per rollout (in "
                           f"{source} forward) and every later pass reuses their output{kept}")
                break
            reasons.append(reason)
        if role not in shares:
            write_line(f"{role}: frozen lower blocks are computed in every pass "
                       f"({reasons[0] if reasons else 'no reference model'})")
    return shares
