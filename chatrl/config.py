"""Typed configuration for every step; flags, YAML files and key=value overrides, defined once.

Field names are DeepSpeed-Chat's argument names (snake_case), so its commands work unchanged;
every field is also accepted in kebab-case (`--per-device-train-batch-size`). A flag is declared
exactly once, on the dataclass that owns it, and shared by inheritance:

    CommonConfig        output, data, precision, logging, checkpoints   (all steps)
    ModelTrainConfig    one trained model: batch, optimizer, ZeRO, LoRA (steps 1, 2, DPO)
      SFTConfig, RMConfig, DPOConfig
    PPOConfig           actor + critic: per-model ZeRO/LoRA/lr, rollout and PPO knobs (step 3)

Resolution order (later wins): dataclass defaults < preset < --config file < key=value < --flags.
With no preset, no config file and no model named, the `cpu-default` preset applies: the
embedded SmolLM2-135M on the demo task, sized for a 2-core CPU. Values are validated before any
weights load; derived values (world size, global batch) are never written back.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import ConfigError

PRESET_DIR = Path(__file__).parent / "configs"


def opt(default, help: str, choices=None, **kw):
    """A config field with its help text (and optional choices) kept beside its default."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
DTYPES = ("auto", "fast", "fp32", "bf16", "fp16")
FLOAT_LISTS = ("data_weights", "reward_weights")  # list options whose items are numbers


@dataclass
class CommonConfig:
    # --- output and reproducibility
    output_dir: Optional[str] = opt(None, "where the step writes its model folder, logs and checkpoints")
    seed: int = opt(1234, "random seed for data order, splits, init and sampling")
    # --- data
    data_path: list = opt(["demo"], "datasets: named (Dahoas/rm-static...), 'demo', local files or "
                                    "save_to_disk folders; several are blended")
    data_weights: Optional[list] = opt(None, "one weight per --data-path source (row-count scale)")
    data_split: str = opt("2,4,4", "shares of each dataset for steps 1,2,3 (DeepSpeed-Chat semantics)")
    data_output_path: Optional[str] = opt(None, "cache folder for tokenized data (default: chatrl cache)")
    skip_bad_rows: bool = opt(False, "skip rows with missing/empty/wrong-typed fields (counted) "
                                     "instead of stopping with an error")
    template: str = opt("auto", "conversation format: chat (tokenizer template), plain "
                                "(Human:/Assistant:), auto", choices=("auto", "chat", "plain"))
    num_padding_at_beginning: int = opt(0, "accepted for DeepSpeed-Chat compatibility; chatrl finds "
                                           "the scored token from the attention mask")
    add_eot_token: bool = opt(False, "end responses with --eot-token instead of the tokenizer's EOS")
    eot_token: str = opt("<|endoftext|>", "end-of-text token used with --add-eot-token")
    # --- precision and devices
    dtype: str = opt("auto", "weights/compute precision; auto = bf16 on bf16 GPUs, else fp32; "
                             "fast = bf16 also on CPUs with AVX512-BF16/AMX", choices=DTYPES)
    compute_fp32_loss: bool = opt(False, "upcast logits to fp32 before the loss")
    offload: bool = opt(False, "ZeRO CPU offload of optimizer state (and params at stage 3)")
    local_rank: int = opt(-1, "set by the DeepSpeed launcher")
    deepspeed_config: Optional[str] = opt(None, "DeepSpeed JSON config merged into the engine config "
                                                "(chatrl's own settings win where both set a value; "
                                                "the merge is logged); alias --deepscale_config")
    # --- logging
    enable_tensorboard: bool = opt(True, "write TensorBoard logs under <output_dir>/tensorboard")
    tensorboard_path: Optional[str] = opt(None, "TensorBoard folder (default <output_dir>/tensorboard)")
    report_to: str = opt("tensorboard,jsonl", "where metrics go besides metrics.jsonl (always "
                                              "written): comma-separated tensorboard, wandb, jsonl, or none")
    wandb_project: Optional[str] = opt(None, "W&B project with --report-to wandb (default: "
                                             "$WANDB_PROJECT, else chatrl)")
    print_loss: bool = opt(False, "print the loss of every step")
    log_interval: int = opt(1, "log metrics every N optimizer steps")
    progress: bool = opt(True, "show progress bars")
    # --- checkpoints
    checkpoint_interval: int = opt(0, "save a resumable checkpoint every N optimizer steps (0: at "
                                      "the end of each epoch only)")
    resume: bool = opt(False, "continue from the last checkpoint in <output_dir>/checkpoints")
    overwrite: bool = opt(False, "delete a previous run's checkpoints and model in <output_dir> and "
                                 "start afresh (without it, a fresh run refuses such a folder)")
    keep_checkpoints: bool = opt(False, "keep checkpoints after the final model is saved (by default "
                                        "they are deleted then: they only serve to resume)")
    max_steps: int = opt(-1, "stop after this many optimizer steps (-1: run all epochs)")

    def validate(self) -> None:
        if self.output_dir is None:
            raise ConfigError("--output-dir is required (where the trained model is written)")
        from .tracking import check_report_to

        check_report_to(self.report_to)  # wandb installed if asked for, before any weights load
        parts = str(self.data_split).split(",")
        if len(parts) != 3:
            raise ConfigError(f'--data-split "{self.data_split}" has {len(parts)} parts; it needs 3, '
                              'e.g. "2,4,4"')
        if self.data_weights is not None and len(self.data_weights) != len(self.data_path):
            raise ConfigError(f"--data-weights has {len(self.data_weights)} values for "
                              f"{len(self.data_path)} --data-path sources; give one weight per source")
        if self.resume and self.overwrite:
            raise ConfigError("--resume continues the run in --output-dir and --overwrite deletes it; "
                              "pass only one of them")
        for name in ("log_interval",):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.deepspeed_config is not None:
            from .engine.ds_user_config import read_deepspeed_config

            read_deepspeed_config(self.deepspeed_config)  # exists and holds a JSON object


def check_layers_unfrozen(cfg, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) < -1:
            raise ConfigError(f"--{name.replace('_', '-')} must be -1 (train every layer) or a count of "
                              f"top blocks >= 0, got {getattr(cfg, name)}")


@dataclass
class ModelTrainConfig(CommonConfig):
    model_name_or_path: Optional[str] = opt(None, "base model: hub id, folder, .gguf file, or none "
                                                  "for the embedded SmolLM2-135M-Instruct")
    per_device_train_batch_size: int = opt(16, "training micro-batch per device")
    per_device_eval_batch_size: int = opt(16, "evaluation batch per device")
    max_seq_len: int = opt(512, "longest prompt + response in tokens (longer rows are truncated)")
    learning_rate: float = opt(5e-5, "peak learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    num_train_epochs: int = opt(1, "passes over the training data")
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0: off)")
    lr_scheduler_type: str = opt("cosine", "learning-rate schedule", choices=SCHEDULERS)
    num_warmup_steps: int = opt(0, "linear warm-up steps")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    dropout: Optional[float] = opt(None, "override the model's dropout probabilities")
    zero_stage: int = opt(0, "DeepSpeed ZeRO stage", choices=(0, 1, 2, 3))
    lora_dim: int = opt(0, "LoRA rank; LoRA is on when > 0")
    lora_alpha: Optional[float] = opt(None, "LoRA alpha (default: equal to the rank, scaling 1)")
    lora_module_name: str = opt("", "apply LoRA to linear layers whose name contains this "
                                    "(DeepSpeed-Chat: 'decoder.layers.' for OPT, 'layers.' for Llama); "
                                    "empty: every linear layer in the transformer blocks")
    only_optimize_lora: bool = opt(False, "train only the LoRA weights")
    num_layers_unfrozen: int = opt(-1, "train only the top N transformer blocks (and the final norm "
                                       "and head above them); embeddings and lower blocks frozen, so "
                                       "the backward pass and optimizer cover only the top (-1: all)")
    lora_learning_rate: float = opt(5e-4, "learning rate of the LoRA weights")
    eval_interval: int = opt(0, "evaluate every N optimizer steps (0: at the end of each epoch)")
    eval_iters: int = opt(100, "at most this many evaluation batches")

    def validate(self) -> None:
        super().validate()
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size",
                     "gradient_accumulation_steps", "max_seq_len", "num_train_epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ConfigError(f"--learning-rate must be > 0, got {self.learning_rate}")
        if self.only_optimize_lora and self.lora_dim <= 0:
            raise ConfigError("--only-optimize-lora needs LoRA: set --lora-dim to a rank > 0 (e.g. 8)")
        check_layers_unfrozen(self, "num_layers_unfrozen")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout}")


@dataclass
class SFTConfig(ModelTrainConfig):
    learning_rate: float = opt(1e-3, "peak learning rate (DeepSpeed-Chat's step-1 default)")
    sft_only_data_path: list = opt([], "SFT-only datasets used wholly in step 1")
    train_on_prompt: bool = opt(False, "also train on prompt tokens (DeepSpeed-Chat's behaviour)")


@dataclass
class RMConfig(ModelTrainConfig):
    learning_rate: float = opt(5e-5, "peak learning rate")
    rm_loss: str = opt("pairwise", "pairwise: -log sigmoid(r_chosen - r_rejected) at the EOS; dschat: "
                                   "DeepSpeed-Chat's mean over tokens after the first divergence",
                       choices=("pairwise", "dschat"))


@dataclass
class DPOConfig(ModelTrainConfig):
    learning_rate: float = opt(5e-6, "peak learning rate")
    beta: float = opt(0.1, "DPO temperature")
    label_smoothing: float = opt(0.0, "conservative DPO label smoothing")
    ref_model_name_or_path: Optional[str] = opt(None, "reference model (default: the starting model)")
    dropout: Optional[float] = opt(0.0, "dropout of the trained policy (default 0, as TRL: with dropout "
                                        "the policy differs from its reference before any update); "
                                        "null in a config file keeps the model's own")
    offload_reference_model: bool = opt(False, "keep the frozen reference model on CPU")


@dataclass
class PPOConfig(CommonConfig):
    # --- models
    actor_model_name_or_path: Optional[str] = opt(None, "actor: the SFT model folder (step 1 output)")
    critic_model_name_or_path: Optional[str] = opt(None, "critic: the reward model folder (step 2 output)")
    reward_model_name_or_path: Optional[str] = opt(None, "frozen reward model (default: the critic's "
                                                         "starting folder)")
    # --- batch shapes
    per_device_generation_batch_size: int = opt(16, "prompts per rollout batch per device")
    per_device_training_batch_size: int = opt(16, "PPO mini-batch per device")
    generation_batches: int = opt(1, "rollout batches collected before each PPO update")
    ppo_epochs: int = opt(1, "passes over each collected experience")
    time_limit: float = opt(0.0, "seconds this step may take: it stops (and saves) after the iteration "
                                 "that leaves too little time for another (0: no limit; chatrl train "
                                 "--time-budget sets it)")
    max_prompt_seq_len: int = opt(256, "longer prompts are dropped (counted)")
    max_answer_seq_len: int = opt(256, "max new tokens per answer")
    num_train_epochs: int = opt(1, "passes over the prompt data")
    gradient_accumulation_steps: int = opt(1, "mini-batches per optimizer step")
    # --- generation
    temperature: float = opt(1.0, "sampling temperature of rollouts (0: greedy)")
    top_p: float = opt(1.0, "nucleus sampling of rollouts")
    top_k: int = opt(0, "top-k sampling of rollouts (0: off)")
    generation_backend: str = opt("hf", "rollout generation backend: hf (Transformers) or llamacpp "
                                        "(llama.cpp on the CPU, Llama/Qwen2 actors; needs "
                                        "`pip install llama-cpp-python`)",
                                  choices=("hf", "llamacpp"))
    rollout_weights: str = opt("same", "weights the rollouts decode with: same (the trained ones) "
                                       "or fp16 (hf: fp16 copies of an fp32 actor's frozen weights "
                                       "on an x86 CPU; llamacpp: every weight and the KV cache in "
                                       "fp16) or q8_0 (llamacpp: 8-bit blocks); see "
                                       "policy/logprob_gap",
                               choices=("same", "fp16", "q8_0"))
    # --- RL hyper-parameters (DeepSpeed-Chat hard-coded these)
    kl_coef: float = opt(0.1, "KL penalty coefficient (kl_ctl)")
    adaptive_kl: bool = opt(False, "adapt kl_coef towards --kl-target (Ziegler et al.)")
    kl_target: float = opt(6.0, "target KL for the adaptive controller")
    kl_horizon: int = opt(10000, "horizon of the adaptive KL controller")
    kl_estimator: str = opt("k1", "per-token KL estimator", choices=("k1", "k2", "k3", "abs"))
    clip_reward_value: float = opt(5.0, "reward score clipped to [-v, v]")
    cliprange: float = opt(0.2, "PPO policy ratio clip")
    cliprange_value: float = opt(0.2, "value clip around the old values")
    gamma: float = opt(1.0, "discount")
    lam: float = opt(0.95, "GAE lambda")
    whiten_advantages: bool = opt(True, "normalise advantages over all rollouts of one update, "
                                        "all ranks")
    recompute_old_logprobs: Optional[bool] = opt(None, "old log-probs from an actor forward over "
                                                       "the rollout instead of the generation logits "
                                                       "(default: on unless the actor is fp32)")
    logprob_gap_warn: float = opt(0.05, "warn when the mean |log p| gap between the old log-probs "
                                        "and the training forward passes this (0: never)")
    missing_eos_penalty: float = opt(0.0, "subtracted from the score of answers cut at "
                                          "--max-answer-seq-len without an EOS")
    normalize_reward: bool = opt(False, "normalise reward scores by their running mean and std "
                                        "(all ranks) before clipping")
    # --- optimisation, per model
    actor_learning_rate: float = opt(9.65e-6, "actor peak learning rate")
    critic_learning_rate: float = opt(5e-6, "critic peak learning rate")
    actor_weight_decay: float = opt(0.0, "actor AdamW weight decay")
    critic_weight_decay: float = opt(0.0, "critic AdamW weight decay")
    lr_scheduler_type: str = opt("cosine", "learning-rate schedule", choices=SCHEDULERS)
    num_warmup_steps: int = opt(100, "linear warm-up steps")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0: off)")
    actor_zero_stage: int = opt(0, "ZeRO stage of the actor", choices=(0, 1, 2, 3))
    critic_zero_stage: int = opt(0, "ZeRO stage of the critic", choices=(0, 1, 2, 3))
    actor_gradient_checkpointing: bool = opt(False, "gradient checkpointing in the actor")
    critic_gradient_checkpointing: bool = opt(False, "gradient checkpointing in the critic")
    actor_dropout: Optional[float] = opt(0.0, "actor dropout (default 0, as TRL: with dropout the "
                                              "training forward is not the policy that sampled, so "
                                              "the PPO ratio starts away from 1); null in a "
                                              "config file keeps the model's own")
    critic_dropout: Optional[float] = opt(0.0, "critic dropout (default 0); null in a config file keeps "
                                               "the model's own")
    actor_lora_dim: int = opt(0, "actor LoRA rank (0: off)")
    actor_lora_module_name: str = opt("", "actor LoRA target filter (see --lora-module-name)")
    critic_lora_dim: int = opt(0, "critic LoRA rank (0: off)")
    critic_lora_module_name: str = opt("", "critic LoRA target filter")
    actor_num_layers_unfrozen: int = opt(-1, "train only the actor's top N transformer blocks "
                                             "(see --num-layers-unfrozen; -1: all)")
    critic_num_layers_unfrozen: int = opt(-1, "train only the critic's top N transformer blocks and "
                                              "its value head (-1: all)")
    share_frozen_trunk: bool = opt(True, "with frozen lower blocks, compute them once per rollout "
                                         "(in the reference / critic scoring forward) and reuse "
                                         "their output in every PPO epoch's training forward")
    only_optimize_lora: bool = opt(False, "train only LoRA weights")
    actor_lora_learning_rate: float = opt(5e-4, "actor LoRA learning rate")
    critic_lora_learning_rate: float = opt(5e-4, "critic LoRA learning rate")
    offload_reference_model: bool = opt(False, "keep the reference model on CPU")
    offload_reward_model: bool = opt(False, "keep the reward model on CPU")
    allow_untrained_reward_head: bool = opt(False, "accept a critic / reward model folder without a "
                                                   "trained value head (its head starts random)")
    # --- hybrid engine (DeepSpeed-Chat names; chatrl's engine is always on)
    enable_hybrid_engine: bool = opt(True, "switch the actor into generation mode for rollouts")
    unpin_actor_parameters: bool = opt(False, "accepted for compatibility")
    release_inference_cache: bool = opt(False, "free the gathered generation weights after each rollout")
    inference_tp_size: int = opt(1, "accepted for compatibility (tensor parallel generation)")
    tp_gather_partition_size: int = opt(8, "accepted for compatibility")
    enable_mixed_precision_lora: bool = opt(False, "accepted for compatibility")
    align_overflow: bool = opt(False, "accepted for compatibility")
    # --- extras
    unsupervised_dataset_name: Optional[str] = opt(None, "PTX: dataset of plain text (hub name or file)")
    unsupervised_dataset_config_name: Optional[str] = opt(None, "PTX: its config name")
    unsup_coef: float = opt(27.8, "PTX loss coefficient")
    enable_ema: bool = opt(False, "keep an EMA of the actor weights (saved as actor_ema/)")
    ema_beta: float = opt(0.992, "EMA decay")
    print_answers: bool = opt(False, "print sampled prompts and answers")
    print_answers_interval: int = opt(1, "print answers every N iterations")
    log_rollouts_interval: int = opt(0, "every N iterations write <output_dir>/rollouts/iter_N.jsonl "
                                        "(tokens, log-probs, KL, values, advantages, rewards) for "
                                        "`chatrl inspect`; 0: never")
    enable_test_mode: bool = opt(False, "stop after --test-stop-step iterations")
    test_stop_step: int = opt(0, "iterations to run in test mode")
    preprocessing_num_workers: Optional[int] = opt(None, "accepted for compatibility (tokenized "
                                                         "data is cached, see --data-output-path)")
    # --- online RL: each choice overrides the algorithm's preset (chatrl/rl/algorithms.py)
    num_generations: Optional[int] = opt(None, "answers sampled per prompt, one group (default: the "
                                               "algorithm's: 1 for PPO, 8 for GRPO)")
    advantage_estimator: Optional[str] = opt(None, "gae (critic) | grpo (group mean) | rloo "
                                                   "(leave-one-out) | reinforce_pp (batch whitened)")
    scale_rewards: Optional[bool] = opt(None, "GRPO: divide each group's advantages by its std")
    loss_aggregation: Optional[str] = opt(None, "token_mean | seq_mean_token_mean | "
                                                "seq_mean_token_sum_norm (Dr. GRPO)")
    ratio_level: Optional[str] = opt(None, "importance ratio per token (PPO/GRPO) or per sequence (GSPO)")
    clip_low: Optional[float] = opt(None, "lower ratio clip: 1 - clip_low (default: --cliprange)")
    clip_high: Optional[float] = opt(None, "upper ratio clip: 1 + clip_high (DAPO: 0.28)")
    kl_placement: Optional[str] = opt(None, "KL to the reference: none | reward | loss")
    dynamic_sampling: Optional[bool] = opt(None, "drop groups whose rewards are all equal and sample "
                                                 "more prompts to refill the batch (DAPO)")
    max_sampling_rounds: int = opt(4, "dynamic sampling: at most this many rollout batches per "
                                      "batch kept")
    overlong_buffer: Optional[int] = opt(None, "over-long penalty: the last N tokens before "
                                               "--max-answer-seq-len cost up to --overlong-penalty (0: off)")
    overlong_penalty: float = opt(1.0, "the largest over-long penalty")
    # --- reward sources (combined with --reward-weights; each logged on its own)
    reward_fn: list = opt([], "reward functions: built-in math | numeric | exact | format, or "
                              "FILE.py:NAME / package.module:NAME with TRL's signature "
                              "fn(prompts, completions, **columns) -> list[float]")
    reward_url: Optional[str] = opt(None, "reward server: POST {prompts, completions, columns} -> "
                                          "{rewards}")
    reward_weights: Optional[list] = opt(None, "one weight per reward source, in the order: "
                                               "--reward-fn entries, the reward model, --reward-url")
    reward_timeout: float = opt(30.0, "seconds to wait for the reward server")
    reward_retries: int = opt(2, "retries of a failed reward-server request")
    skip_bad_rewards: bool = opt(False, "score 0 (and count) samples whose reward function raised "
                                        "or returned NaN, instead of stopping")
    answer_column: str = opt("answer", "prompt-data column the built-in verifiers compare with")
    format_pattern: Optional[str] = opt(None, "regex of the `format` reward (default: an answer "
                                              "after ####, in \\boxed{} or after 'the answer is')")
    # --- evaluation during training (held-out prompts)
    eval_interval: int = opt(0, "evaluate every N iterations (0: only at the end)")
    eval_prompts: int = opt(0, "held-out prompts per evaluation at the start, every "
                               "--eval-interval iterations and at the end (0: none)")
    eval_samples: int = opt(4, "sampled answers per held-out prompt, pass@k for k = this (0: "
                               "greedy answers only)")
    eval_temperature: float = opt(1.0, "sampling temperature of evaluation answers")
    eval_top_p: float = opt(1.0, "top-p of evaluation answers")
    per_device_eval_batch_size: int = opt(32, "held-out answers generated at once per device "
                                              "(greedy and sampled; evaluation only)")

    def validate(self) -> None:
        super().validate()
        check_layers_unfrozen(self, "actor_num_layers_unfrozen", "critic_num_layers_unfrozen")
        for name in ("per_device_generation_batch_size", "per_device_training_batch_size",
                     "generation_batches", "ppo_epochs", "max_prompt_seq_len", "max_answer_seq_len",
                     "num_train_epochs", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.actor_model_name_or_path is None:
            raise ConfigError("--actor-model-name-or-path is required: the SFT model folder "
                              "(e.g. output/actor-models/default from `chatrl sft`)")
        algo = self.algorithm()
        if self.critic_model_name_or_path is None and algo.uses_critic:
            raise ConfigError("--critic-model-name-or-path is required: the reward model folder "
                              "(e.g. output/reward-models/default from `chatrl rm`)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p}")
        for name in ("actor_dropout", "critic_dropout"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1), got {value}")
        if self.temperature < 0:
            raise ConfigError(f"--temperature must be >= 0, got {self.temperature}")
        # Each update (its --generation-batches rollout batches) is cut into optimizer steps of
        # micro-batch x accumulation rows. A remainder would leave DeepSpeed's accumulation
        # counter mid-step, so the next update's (or PTX's) micro-batches would join that step.
        G, micro = algo.num_generations, self.per_device_training_batch_size
        gen = self.per_device_generation_batch_size * G
        step_rows = micro * self.gradient_accumulation_steps
        if (gen * self.generation_batches) % step_rows:
            what = (f"--per-device-generation-batch-size {gen}" if G == 1 else
                    f"--per-device-generation-batch-size {self.per_device_generation_batch_size} x "
                    f"--num-generations {G} = {gen} answers")
            if self.generation_batches > 1:
                what += f" x --generation-batches {self.generation_batches}"
            k = step_rows // math.gcd(gen, step_rows)
            raise ConfigError(
                f"{what} is not a multiple of "
                f"--per-device-training-batch-size {micro} x --gradient-accumulation-steps "
                f"{self.gradient_accumulation_steps} = {step_rows}, so one optimizer step would mix "
                f"two updates (or PPO and PTX); collect --generation-batches {k} rollout batches per "
                f"update (as DeepSpeed-Chat's accumulation over {k} rollouts), raise the generation "
                f"batch to a multiple of {step_rows}, or lower the other two")
        if self.missing_eos_penalty < 0:
            raise ConfigError(f"--missing-eos-penalty is subtracted from the score; give a value "
                              f">= 0, got {self.missing_eos_penalty}")
        if (self.unsupervised_dataset_name is None) != (self.unsupervised_dataset_config_name is None) \
                and self.unsupervised_dataset_name is not None and not os.path.exists(
                    self.unsupervised_dataset_name):
            raise ConfigError("PTX needs both --unsupervised-dataset-name and "
                              "--unsupervised-dataset-config-name (or a local text file as the name)")

        if self.reward_weights is not None and any(not isinstance(w, float) for w in self.reward_weights):
            raise ConfigError(f"--reward-weights {self.reward_weights} must be numbers")
        if self.per_device_eval_batch_size < 1:
            raise ConfigError(f"per_device_eval_batch_size must be >= 1, got "
                              f"{self.per_device_eval_batch_size}")
        for name in ("eval_prompts", "eval_samples", "max_sampling_rounds", "reward_retries"):
            least = 1 if name == "max_sampling_rounds" else 0
            if getattr(self, name) < least:
                raise ConfigError(f"--{name.replace('_', '-')} is {getattr(self, name)}; it must be "
                                  f">= {least}")

    def algorithm(self):
        """The online-RL choices of this run: the --algo preset with every option set here on
        top (an AlgoSettings; ConfigError naming the flag when they do not fit together)."""
        from .rl.algorithms import resolve_algorithm

        clip = self.cliprange
        try:
            return resolve_algorithm(
                getattr(self, "algo", "ppo"), max_answer_len=self.max_answer_seq_len,
                estimator=self.advantage_estimator, scale_std=self.scale_rewards,
                aggregation=self.loss_aggregation, ratio_level=self.ratio_level,
                clip_low=self.clip_low if self.clip_low is not None else clip,
                clip_high=self.clip_high if self.clip_high is not None else
                (clip if self.clip_low is None else self.clip_low),
                kl_placement=self.kl_placement, kl_coef=self.kl_coef, kl_estimator=self.kl_estimator,
                whiten=self.whiten_advantages, dynamic_sampling=self.dynamic_sampling,
                overlong_buffer=self.overlong_buffer, num_generations=self.num_generations)
        except ValueError as e:
            raise ConfigError(f"--algo {getattr(self, 'algo', 'ppo')}: {e} (see chatrl "
                              f"{getattr(self, 'algo', 'ppo')} --help)") from e


@dataclass
class RLConfig(PPOConfig):
    """`chatrl grpo` / `chatrl rl --algo ...`: online RL from any policy (an SFT folder or a base
    model) with rule-based, function, reward-model or remote rewards. Unset choices come from the
    algorithm's preset; PPO (--algo ppo) also needs a critic."""
    algo: str = opt("grpo", "the algorithm preset", choices=("ppo", "grpo", "dr_grpo", "dapo", "rloo",
                                                             "reinforce_pp", "gspo"))
    data_path: list = opt(["arith"], "prompt data: 'arith' (built-in verifiable arithmetic), "
                                     "openai/gsm8k, hendrycks/competition_math, or local "
                                     "JSONL/Parquet/save_to_disk prompts with extra columns")
    actor_model_name_or_path: Optional[str] = opt("default", "the policy: an SFT folder or any "
                                                             "model (default: the embedded "
                                                             "SmolLM2-135M-Instruct)")
    critic_model_name_or_path: Optional[str] = opt(None, "critic (PPO only): a reward model folder")
    kl_coef: Optional[float] = opt(None, "KL coefficient (default: the algorithm's; 0 loads no "
                                         "reference model)")
    kl_estimator: Optional[str] = opt(None, "per-token KL estimator (default: the algorithm's)",
                                      choices=("k1", "k2", "k3", "abs"))
    cliprange: Optional[float] = opt(None, "ratio clip (default: the algorithm's)")
    whiten_advantages: Optional[bool] = opt(None, "whiten advantages over the update (default: "
                                                  "the algorithm's)")
    per_device_generation_batch_size: int = opt(4, "prompts per rollout batch per device")
    per_device_training_batch_size: int = opt(8, "answers per mini-batch per device")
    actor_learning_rate: float = opt(1e-6, "actor peak learning rate")
    num_warmup_steps: int = opt(0, "linear warm-up steps")
    lr_scheduler_type: str = opt("constant", "learning-rate schedule", choices=SCHEDULERS)
    max_prompt_seq_len: int = opt(256, "longer prompts are dropped (counted)")
    max_answer_seq_len: int = opt(256, "max new tokens per answer")
    eval_prompts: int = opt(64, "held-out prompts per evaluation at the start, every "
                                "--eval-interval iterations and at the end (0: none)")


STEP_CONFIGS = {"sft": SFTConfig, "rm": RMConfig, "ppo": PPOConfig, "dpo": DPOConfig,
                "grpo": RLConfig}


# ----------------------------------------------------------------------------- parsing

def _base_type(tp) -> type:
    """int / float / str / bool / list of the annotation (Optional[...] unwrapped)."""
    if isinstance(tp, str):
        tp = eval(tp, vars(typing) | {"Optional": Optional})  # annotations are strings here
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin is list or tp is list:
        return list
    return tp


def _coerce(name: str, tp: type, value: Any, source: str) -> Any:
    """Convert a YAML or key=value value to the field's type, with an error naming its source."""
    if value is None:
        return None
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            low = str(value).lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if tp is list:
            items = list(value) if isinstance(value, (list, tuple)) else \
                [v for v in re.split(r"[,\s]+", str(value)) if v]
            return [float(v) for v in items] if name in FLOAT_LISTS else [str(v) for v in items]
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return tp(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {name}={value!r} is not a valid {tp.__name__}") from None


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def add_config_args(parser: argparse.ArgumentParser, cls, skip: tuple = ()) -> None:
    """One flag per field, in snake_case and kebab-case; defaults suppressed so that only what the
    user typed lands in the namespace (files and presets fill the rest)."""
    group = parser.add_argument_group(f"{cls.__name__} options")
    for name, f in _fields(cls).items():
        if name in skip:
            continue
        tp = _base_type(f.type)
        flags = [f"--{name}"]
        if "_" in name:
            flags.append(f"--{name.replace('_', '-')}")
        kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": f.metadata.get("help")}
        if tp is bool:
            # `--flag` turns on; `--flag false` / `--no-flag` turn off.
            group.add_argument(*flags, nargs="?", const=True, type=lambda v, n=name: _coerce(n, bool, v, "command line"), **kw)
            negs = [f"--no-{name.replace('_', '-')}"] + ([f"--no_{name}"] if "_" in name else [])
            group.add_argument(*negs, dest=name, action="store_false",
                               default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        elif tp is list:
            elem = float if name in FLOAT_LISTS else str
            group.add_argument(*flags, nargs="+", type=elem, **kw)
        else:
            choices = f.metadata.get("choices")
            group.add_argument(*flags, type=tp, choices=choices, **kw)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", action="append", default=[],
                        help="YAML config file (repeatable; later files win)")
    parser.add_argument("--preset", default=None,
                        help=f"shipped preset: {', '.join(list_presets())}")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. learning_rate=1e-4")


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_yaml(path: str | Path, section: str | None = None) -> dict:
    """A config file's values: top-level keys plus, if present, the `section` block (e.g. `sft:`)."""
    top, own = load_yaml_parts(path, section)
    return {**top, **own}


def load_yaml_parts(path: str | Path, section: str | None = None) -> tuple[dict, dict]:
    """(top-level keys, keys of the `section` block) of a YAML config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value")
    top = {k: v for k, v in raw.items() if not isinstance(v, dict)}
    own = dict(raw[section]) if section and isinstance(raw.get(section), dict) else {}
    return top, own


def preset_path(name: str) -> Path:
    p = PRESET_DIR / f"{name}.yaml"
    if not p.exists():
        raise ConfigError(f"--preset {name!r} does not exist; shipped presets: {', '.join(list_presets())}")
    return p


def build_config(cls, *, cli: dict | None = None, files: list | None = None, preset: str | None = None,
                 overrides: list | None = None, section: str | None = None, validate: bool = True):
    """Merge defaults < preset < files < key=value < cli into a validated `cls` instance."""
    known = _fields(cls)
    values: dict[str, Any] = {}

    def merge(src: dict, where: str, strict: bool = True):
        for k, v in src.items():
            k = k.replace("-", "_")
            if k not in known:
                if strict:
                    close = [n for n in known if k in n or n in k][:3]
                    hint = f"; did you mean {', '.join(close)}?" if close else ""
                    raise ConfigError(f"{where}: unknown option {k!r} for {section or cls.__name__}{hint}")
                continue
            values[k] = _coerce(k, _base_type(known[k].type), v, where)
            choices = known[k].metadata.get("choices")
            if choices and values[k] is not None and values[k] not in choices:
                raise ConfigError(f"{where}: {k} {values[k]!r} is not one of "
                                  f"{', '.join(map(str, choices))}")

    def merge_file(path: Path, where: str):
        # Top-level keys apply to every step that has them (and must exist in some step);
        # keys in this step's section must belong to it.
        top, own = load_yaml_parts(path, section)
        every = set().union(*(_fields(c) for c in STEP_CONFIGS.values()))
        unknown = [k for k in top if k.replace("-", "_") not in every]
        if unknown:
            raise ConfigError(f"{where}: unknown option(s) {', '.join(map(repr, unknown))}")
        merge(top, where, strict=False)
        merge(own, f"{where} [{section}]", strict=True)

    if preset:
        merge_file(preset_path(preset), f"preset {preset}")
    for f in files or []:
        merge_file(Path(f), str(f))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. learning_rate=1e-4)")
        k, v = item.split("=", 1)
        merge({k: yaml.safe_load(v) if v else v}, f"override {item!r}")
    merge(cli or {}, "command line")
    cfg = cls(**values)
    if validate:
        cfg.validate()
    return cfg


def model_named(cli: dict, files: list, overrides: list) -> bool:
    keys = ("model_name_or_path", "actor_model_name_or_path", "actor_model")
    if any(cli.get(k) for k in keys):
        return True
    for o in overrides or []:
        if o.split("=", 1)[0].replace("-", "_") in keys:
            return True
    return bool(files)


OUTPUT_ROOT = "output"
_OUTPUT_KIND = {"sft": "actor-models", "rm": "reward-models", "ppo": "step3-models", "dpo": "dpo-models",
                "grpo": "rl-models"}



def model_tag(name: str | None) -> str:
    """Short folder name for a model: 'smollm2-135m-instruct' for the default, 'opt-1.3b' for
    facebook/opt-1.3b, the folder name for a local path."""
    if not name or name in ("default",):
        return "smollm2-135m-instruct"
    return Path(str(name).rstrip("/")).name.lower().replace(".gguf", "") or "model"


def default_output_dir(step: str, model: str | None, root: str = OUTPUT_ROOT) -> str:
    """DeepSpeed-Chat's layout: output/actor-models/<model>, output/reward-models/<model>,
    output/step3-models/<actor model>."""
    return str(Path(root) / _OUTPUT_KIND[step] / model_tag(model))


def fill_default_paths(step: str, values: dict, root: str = OUTPUT_ROOT,
                       model_given: bool = True) -> dict:
    """Default output folder, and for PPO the default step-1/2 outputs as actor and critic. For
    online RL with no model named: the default `chatrl sft` output when it exists (so `chatrl sft`
    then `chatrl grpo` continues from step 1, as `chatrl ppo` does), else the embedded model."""
    values = dict(values)
    sft_model = Path(default_output_dir("sft", None, root)) / "model"
    if step == "grpo" and not model_given and (sft_model / "config.json").is_file():
        values["actor_model_name_or_path"] = str(sft_model)
    if step == "ppo":
        if not values.get("actor_model_name_or_path"):
            values["actor_model_name_or_path"] = default_output_dir("sft", None, root)
        if not values.get("critic_model_name_or_path"):
            values["critic_model_name_or_path"] = default_output_dir("rm", None, root)
        model = values["actor_model_name_or_path"]
    elif step == "grpo":
        model = values.get("actor_model_name_or_path")
    else:
        model = values.get("model_name_or_path")
    if not values.get("output_dir"):
        values["output_dir"] = default_output_dir(step, model, root)
    return values


def parse_step_args(step: str, argv: list[str] | None = None, prog: str | None = None):
    """Parse a step's command line into its config (used by `chatrl sft|rm|ppo|dpo`)."""
    cls = STEP_CONFIGS[step]
    parser = argparse.ArgumentParser(prog=prog or f"chatrl {step}",
                                     description=f"chatrl step: {step}")
    add_common_args(parser)
    add_config_args(parser, cls)
    from .dschat.args import IGNORED_DEST, add_deepspeed_args

    add_deepspeed_args(parser, config_flag=False)  # --deepspeed, --deepscale_config... (DeepSpeed-Chat)
    ns = parser.parse_args(argv)
    cli = {k: v for k, v in vars(ns).items() if k not in ("config", "preset", "overrides", IGNORED_DEST)}
    preset, named = ns.preset, model_named(cli, ns.config, ns.overrides)
    if preset is None and not named:
        preset = "cpu-default"
    cfg = build_config(cls, cli=cli, files=ns.config, preset=preset, overrides=ns.overrides,
                       section=step, validate=False)
    cfg = dataclasses.replace(cfg, **fill_default_paths(step, {
        k: getattr(cfg, k) for k in ("output_dir", "model_name_or_path", "actor_model_name_or_path",
                                     "critic_model_name_or_path") if hasattr(cfg, k)},
        model_given=named))
    cfg.validate()
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: str | Path) -> None:
    """Write the resolved config (every field) as YAML beside a step's output."""
    text = f"# resolved {type(cfg).__name__} (every field; usable as --config)\n"
    Path(path).write_text(text + yaml.safe_dump(to_dict(cfg), sort_keys=False))


def from_namespace(cls, ns) -> Any:
    """Translate any attribute object (e.g. DeepSpeed-Chat's argparse namespace) into `cls`.

    Names `cls` knows are taken; missing names keep their defaults; others are ignored.
    """
    known = _fields(cls)
    src = vars(ns) if hasattr(ns, "__dict__") else dict(ns)
    values = {}
    for k, v in src.items():
        if k in known and v is not None:
            values[k] = _coerce(k, _base_type(known[k].type), v, "args")
    return cls(**values)
