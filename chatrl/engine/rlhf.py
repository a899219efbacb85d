"""The four models of step 3 and how each is wrapped.

    actor      SFT model, trained      DeepSpeed engine + hybrid engine (generation mode)
    reference  frozen copy of the SFT  plain module in eval mode (ZeRO-3 partitioned if the actor is)
    critic     reward model, trained   DeepSpeed engine
    reward     frozen reward model     plain module in eval mode (optionally kept on CPU)
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass

import torch

from ..models import load_causal_lm
from ..models.load import check_same_tokenizer, unwrap
from ..models.freeze import report_trainable
from ..models.lora import apply_lora
from ..models.reward import RewardModel
from . import ds
from .hybrid import HybridEngine


@dataclass(frozen=True)
class ModelSpec:
    """How one step-3 model is built (taken from the PPO config by the caller)."""
    path: str
    zero_stage: int = 0
    dropout: float | None = None
    lora_dim: int = 0
    lora_module_name: str = ""
    only_optimize_lora: bool = False
    lr: float = 1e-6
    lora_lr: float = 5e-4
    weight_decay: float = 0.0
    gradient_checkpointing: bool = False
    layers_unfrozen: int = -1  # train only the top N transformer blocks (-1: all)


def _frozen(model: torch.nn.Module, zero_stage: int, dtype: str, offload_to_cpu: bool):
    """An inference-only model: eval mode, no grads; partitioned by ZeRO-3 like the trained ones
    (DeepSpeed-Chat's approach), else a plain module in `dtype` on the device (or the CPU)."""
    model.eval()
    model.requires_grad_(False)
    if zero_stage == 3:
        import deepspeed

        config = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": ds.world_size(),
                  "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                  "bf16": {"enabled": dtype == "bf16"}, "fp16": {"enabled": dtype == "fp16"}}
        engine, *_ = deepspeed.initialize(model=model, config=config)
        ds.track_engine(engine)
        engine.eval()
        return engine
    target = torch.device("cpu") if offload_to_cpu else ds.device()
    return model.to(device=target, dtype=ds_dtype(dtype))


def ds_dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def resolve_generation(backend: str, kind: str, dtype: str, config, device,
                       quiet: bool = False) -> tuple[str, str]:
    """(backend, rollout weights) that apply here: llama.cpp where the actor converts and runs on
    the CPU, else Transformers with a note saying why (none when `quiet`: the time budget's probe
    asks too)."""
    say = not quiet and ds.is_main()
    if backend == "llamacpp":
        from .llamacpp import unsupported

        why = unsupported(config, device)
        if why is None:
            return backend, kind
        if say:
            print(f"note: --generation-backend llamacpp ignored: {why}; rollouts use Transformers",
                  file=sys.stderr)
    if kind == "q8_0":
        if say:
            print("note: --rollout-weights q8_0 needs --generation-backend llamacpp; rollouts decode "
                  "with the trained weights", file=sys.stderr)
        kind = "same"
    return "hf", resolve_rollout_weights(kind, dtype, quiet)


def resolve_rollout_weights(kind: str, dtype: str, quiet: bool = False) -> str:
    """--rollout-weights fp16 where it applies (an fp32 actor on an x86 CPU), else `same` with a
    note saying why."""
    if kind != "fp16":
        return kind
    from .rollout_weights import fp16_kernel_available

    why = ("the actor trains in " + dtype if dtype != "fp32" else
           "rollouts run on the GPU" if torch.cuda.is_available() else
           None if fp16_kernel_available() else "this CPU build has no fbgemm (x86 only)")
    if why is None:
        return "fp16"
    if not quiet and ds.is_main():
        print(f"note: --rollout-weights fp16 ignored: {why}; rollouts decode with the trained "
              f"weights", file=sys.stderr)
    return "same"


class RLHFModels:
    """Builds and holds actor, reference, critic, reward (+ actor EMA)."""

    def __init__(self, actor: ModelSpec, critic: ModelSpec | None, reward_path: str | None, tokenizer, *,
                 dtype: str, offload: bool, micro_batch: int, grad_accum: int, grad_clip: float,
                 scheduler: str, warmup_steps: int, total_steps: int,
                 offload_reference_model: bool = False, offload_reward_model: bool = False,
                 enable_ema: bool = False, release_inference_cache: bool = False,
                 actor_total_steps: int | None = None, reference: bool = True,
                 deepspeed_config: str | None = None, rollout_weights: str = "same",
                 generation_backend: str = "hf"):
        """critic None: no critic (critic-free algorithms); reward_path None: no reward model
        (rule-based or remote rewards); reference False: no reference model (KL coefficient 0)."""
        self.tokenizer = tokenizer
        self.dtype = dtype
        # The critic and reward model read the actor's token ids: their vocabularies must match.
        if critic is not None:
            check_same_tokenizer(actor.path, critic.path, ("actor", "critic"))
        if reward_path is not None and (critic is None or reward_path != critic.path):
            check_same_tokenizer(actor.path, reward_path, ("actor", "reward model"))

        def engine_for(model, spec: ModelSpec, n_steps: int, role: str):
            if spec.lora_dim > 0:
                model = apply_lora(model, spec.lora_dim, None, spec.lora_module_name,
                                   only_optimize=spec.only_optimize_lora)
            report_trainable(model, spec.layers_unfrozen, role)
            return ds.build_engine(model, ds.EngineSpec(
                zero_stage=spec.zero_stage, offload=offload, dtype=dtype, micro_batch=micro_batch,
                grad_accum=grad_accum, grad_clip=grad_clip, lr=spec.lr, weight_decay=spec.weight_decay,
                lora_lr=spec.lora_lr, scheduler=scheduler, warmup_steps=warmup_steps,
                total_steps=n_steps, gradient_checkpointing=spec.gradient_checkpointing,
                deepspeed_config=deepspeed_config))

        # actor + reference (the same weights at the start)
        actor_model = load_causal_lm(actor.path, dtype="fp32", dropout=actor.dropout, tokenizer=tokenizer)
        ref_model = copy.deepcopy(actor_model) if reference else None
        # The actor may take more optimizer steps than the critic (PTX adds one after each PPO
        # step): each scheduler is built for its own model's count.
        self.actor = engine_for(actor_model, actor, actor_total_steps or total_steps, "actor: ")
        backend, rollout_weights = resolve_generation(generation_backend, rollout_weights, dtype,
                                                      unwrap(actor_model).config,
                                                      next(actor_model.parameters()).device)
        self.hybrid = HybridEngine(self.actor, release_inference_cache=release_inference_cache,
                                   backend=backend, rollout_weights=rollout_weights)
        self.ref = (_frozen(ref_model, actor.zero_stage, dtype, offload_reference_model)
                    if reference else None)
        # critic + reward
        critic_model = (RewardModel.from_pretrained(critic.path, dtype="fp32", dropout=critic.dropout,
                                                    tokenizer=tokenizer) if critic else None)
        if reward_path is None:
            reward_model = None
        elif critic is not None and reward_path == critic.path:
            reward_model = copy.deepcopy(critic_model)
        else:
            reward_model = RewardModel.from_pretrained(reward_path, dtype="fp32", dropout=0.0,
                                                        tokenizer=tokenizer)
        self.critic = engine_for(critic_model, critic, total_steps, "critic: ") if critic else None
        self.reward = (_frozen(reward_model, critic.zero_stage if critic else actor.zero_stage, dtype,
                               offload_reward_model) if reward_model is not None else None)
        # EMA of the actor: a full fp32 copy on the CPU (bf16 would swallow most updates)
        self.actor_ema = None
        if enable_ema:
            self.actor_ema = {k: v.float() for k, v in ds.full_state_dict(self.actor.module).items()}

    def update_ema(self, beta: float) -> None:
        from ..rl import ema_update

        if self.actor_ema is None:
            return
        current = ds.full_state_dict(self.actor.module)
        keys = [k for k in self.actor_ema if current[k].is_floating_point()]
        ema_update([self.actor_ema[k] for k in keys], [current[k] for k in keys], beta)
