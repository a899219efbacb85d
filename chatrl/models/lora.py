"""LoRA through PEFT, with DeepSpeed-Chat's knobs: rank, module-name filter, only-optimize-LoRA,
its own learning rate; merged weights for saving and for generation.

Adapters are injected in place (`peft.inject_adapter_in_model`), so the model keeps its class and
forward signature (a reward model stays a RewardModel). Saved folders hold merged weights: plain
Hugging Face checkpoints that load without PEFT.
"""

from __future__ import annotations

import re
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import ConfigError

# Linear layers inside the repeated transformer blocks of any family we know
# (Llama/Qwen/Mistral `layers.N.`, GPT-2/BLOOM `h.N.`, GPT-NeoX `layers.N.`, OPT `decoder.layers.N.`).
_BLOCK = re.compile(r"(^|\.)(layers|h|blocks|layer)\.\d+\.")
_EXCLUDE = ("lm_head", "v_head", "embed_out", "score")


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"  # GPT-2's Conv1D


def lora_targets(model: nn.Module, module_filter: str = "") -> list[str]:
    names = []
    for name, module in model.named_modules():
        if not _is_linear(module) or any(x in name.split(".")[-1] for x in _EXCLUDE):
            continue
        if (module_filter and module_filter in name) or (not module_filter and _BLOCK.search(name)):
            names.append(name)
    return names


def apply_lora(model: nn.Module, rank: int, alpha: float | None = None, module_filter: str = "",
               dropout: float = 0.0, only_optimize: bool = False) -> nn.Module:
    """Inject LoRA adapters of `rank` into the linear layers selected by `module_filter`.

    Trainable afterwards (DeepSpeed-Chat's meaning of its flags):
    - `only_optimize=False`: every weight that trained before (base weights, embeddings, norms, a
      reward model's value head) plus the adapters;
    - `only_optimize=True`: the adapters, and a reward model's value head (it is new: a frozen
      random head would make the reward meaningless); nothing else.
    PEFT's injection alone freezes every non-adapter weight, so both cases are set here.
    """
    from peft import LoraConfig, inject_adapter_in_model

    # Names change on injection (`q_proj.weight` -> `q_proj.base_layer.weight`): keep the objects.
    trainable_before = {id(p) for p in model.parameters() if p.requires_grad}

    targets = lora_targets(model, module_filter)
    if not targets:
        raise ConfigError(
            f"--lora-module-name {module_filter!r} matches no linear layer of this "
            f"{type(model).__name__}; examples of its module names: "
            + ", ".join(n for n, m in list(model.named_modules())[:40] if _is_linear(m))[:300])
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank,
                        target_modules=targets, lora_dropout=dropout, bias="none",
                        fan_in_fan_out=any(type(m).__name__ == "Conv1D" for m in model.modules()))
    model = inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        if "lora_" in name or name.startswith("v_head."):
            p.requires_grad_(True)
        else:
            p.requires_grad_(not only_optimize and id(p) in trainable_before)
    return model


def has_lora(model: nn.Module) -> bool:
    return any("lora_" in n for n, _ in model.named_parameters())


def lora_layers(model: nn.Module):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def param_groups(model: nn.Module, lr: float, weight_decay: float, lora_lr: float) -> list[dict]:
    """Optimizer groups: base weights (decayed except biases/norms), no-decay, LoRA weights."""
    decay, no_decay, lora = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "lora_" in name:
            lora.append(p)
        elif p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "lr": lr, "weight_decay": weight_decay},
              {"params": no_decay, "lr": lr, "weight_decay": 0.0},
              {"params": lora, "lr": lora_lr, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _delta(a: torch.Tensor, b: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """scale * B @ A in fp32, laid out like the base weight (transposed for GPT-2's Conv1D)."""
    delta = (b.float() @ a.float()) * module.scaling["default"]
    return delta.T if getattr(module, "fan_in_fan_out", False) else delta


def merged_state_dict(model: nn.Module, state_dict: dict | None = None) -> dict:
    """State dict with LoRA deltas folded into the base weights and PEFT's names undone.

    `x.base_layer.weight` + scale * B @ A  ->  `x.weight` (summed in fp32, rounded once to the
    weight's dtype); lora_* tensors dropped. Works on a given (e.g. gathered) `state_dict` without
    touching the module.
    """
    sd = dict(model.state_dict() if state_dict is None else state_dict)
    out = {}
    for name, module in model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in getattr(module, "lora_A", {}):
            continue
        delta = _delta(sd[f"{name}.lora_A.default.weight"], sd[f"{name}.lora_B.default.weight"], module)
        base = sd[f"{name}.base_layer.weight"]
        out[f"{name}.weight"] = (base.float() + delta.to(base.device)).to(base.dtype)
    for k, v in sd.items():
        if "lora_" in k:
            continue
        k2 = k.replace(".base_layer.", ".")
        out.setdefault(k2, v)
    return out


@contextmanager
def lora_merged(model: nn.Module):
    """Compute with the LoRA adapters folded into the weights for the duration (generation).

    Each adapted layer's weight becomes W + scale * B @ A (the tensors `merged_state_dict` gives,
    so ZeRO 0-2 generate with the same weights as the ZeRO-3 inference copy), and the layer is
    marked merged so PEFT does not add the adapter a second time. On exit the exact W is copied
    back from a saved copy: undoing the merge arithmetically, round(round(W + dW) - dW), is not W
    in bf16 (issue 8: 50 rollouts changed 22% of the frozen base entries), nor always in fp32.
    The saved copy costs the adapted weights' size in memory during generation.
    """
    layers = [m for m in lora_layers(model) if not m.merged and "default" in m.lora_A]
    merged = []  # (layer, its exact base weight) of every layer folded so far
    try:
        with torch.no_grad():
            for m in layers:
                w = m.base_layer.weight
                w0 = w.detach().clone()
                w.copy_((w.float() + _delta(m.lora_A["default"].weight,
                                            m.lora_B["default"].weight, m)).to(w.dtype))
                merged.append((m, w0))
                m.merged_adapters.append("default")
        yield model
    finally:
        with torch.no_grad():
            for m, w0 in merged:
                m.base_layer.weight.copy_(w0)
                if "default" in m.merged_adapters:
                    m.merged_adapters.remove("default")
