"""fp16 copies of an fp32 actor's weights for rollouts on a CPU (`--rollout-weights fp16`).

At a rollout's batch sizes (4-16 rows per decode step) a CPU decode step is bound by reading the
weights: every token reads all of them. fbgemm's fp16 GEMM (`quantized::linear_dynamic_fp16`,
part of torch's x86 build) keeps each weight in fp16, half the bytes, converts it to fp32 in
registers and multiplies in fp32: activations, accumulation and outputs stay fp32, and the only
change is the weights' rounding to fp16 (a relative error below 2^-11).

`Fp16RolloutWeights.applied(model)` routes the model's frozen fp32 `nn.Linear`s (the LM head
included when it is frozen) through those copies for inputs of at most `max_rows` rows, i.e.
decode steps; the prompt's prefill, a compute-bound product, keeps the fp32 weights (fbgemm's fp16
kernel is slower there with AVX2). Packing costs ~15 ns per weight against ~0.2 ns saved per
weight and decode step (SmolLM2, 4 rows, AVX2): a weight that changes at every update would need
about 70 decode steps per rollout to pay for its packing (measured: 0.86x with every weight packed
at each rollout). So only frozen weights get copies, packed at the first rollout and kept for the
run; trained ones (requires_grad) and LoRA base layers merged into keep their fp32 weights. The
hybrid engine leaves LoRA adapters unmerged under this option, so the frozen base layers use
their copies and the small adapters run beside them in fp32.

The policy that samples differs from the trained one by that rounding; PPO's old log-probs come
from the rollout (the behaviour policy) unless --recompute-old-logprobs, and the pre-update forward
logs the gap between the two as policy/logprob_gap.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

MAX_ROWS = 32  # fbgemm fp16 vs fp32 (AVX2 kernels, SmolLM2's shapes): 1.75x at 4 rows, parity at 128


def fp16_kernel_available() -> bool:
    """fbgemm (x86 only) provides the fp16-weight GEMM."""
    return "fbgemm" in torch.backends.quantized.supported_engines


def _eligible(module: torch.nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return (isinstance(module, torch.nn.Linear) and isinstance(w, torch.Tensor)
            and w.dtype == torch.float32 and w.device.type == "cpu" and w.dim() == 2 and w.numel() > 0)


class Fp16RolloutWeights:
    """Caches fbgemm-packed fp16 copies of a model's Linear weights across rollouts."""

    def __init__(self, max_rows: int = MAX_ROWS):
        self.max_rows = max_rows
        self._packed: dict[int, tuple[tuple, object]] = {}  # id(module) -> (key, packed)
        self.repacked = 0  # weights packed by the last `applied` (for logs and tests)

    def _pack(self, module: torch.nn.Linear):
        w, b = module.weight, module.bias
        key = (w.data_ptr(), w._version, tuple(w.shape),
               None if b is None else (b.data_ptr(), b._version))
        cached = self._packed.get(id(module))
        if cached is not None and cached[0] == key:
            return cached[1]
        packed = torch.ops.quantized.linear_prepack_fp16(w.detach(), None if b is None else b.detach())
        self._packed[id(module)] = (key, packed)
        self.repacked += 1
        return packed

    @contextmanager
    def applied(self, model: torch.nn.Module):
        """Within: the model's frozen eligible Linears use their fp16 copies for small inputs."""
        self.repacked = 0
        patched = []
        merged_into = {id(m.base_layer) for m in model.modules()  # LoRA layers merged for the rollout
                       if isinstance(getattr(m, "base_layer", None), torch.nn.Module)
                       and getattr(m, "merged", False)}
        with torch.no_grad():
            for module in model.modules():
                if not _eligible(module) or id(module) in merged_into or any(
                        p.requires_grad for p in module.parameters(recurse=False)):
                    continue
                packed = self._pack(module)
                patched.append((module, module.__dict__.get("forward")))
                module.forward = self._forward(module, packed)
        live = {id(m) for m, _ in patched}
        for gone in [k for k in self._packed if k not in live]:  # unfrozen, replaced or dropped
            del self._packed[gone]
        try:
            yield
        finally:
            for module, own in patched:
                if own is None:
                    del module.forward  # back to the class's forward
                else:
                    module.forward = own

    def _forward(self, module: torch.nn.Linear, packed):
        full = module.forward
        max_rows = self.max_rows
        out_features = module.out_features

        def forward(x: torch.Tensor) -> torch.Tensor:
            if x.dtype != torch.float32 or x.numel() // x.shape[-1] > max_rows:
                return full(x)
            y = torch.ops.quantized.linear_dynamic_fp16(x.reshape(-1, x.shape[-1]).contiguous(), packed)
            return y.reshape(*x.shape[:-1], out_features)

        return forward
