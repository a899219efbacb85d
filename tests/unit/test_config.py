"""Configuration: flag spellings, precedence of the sources, presets, saved configs, and the
DeepSpeed-Chat namespace bridge. No training: parse_step_args / build_config directly."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import yaml

from chatrl import config as C
from chatrl.config import (PPOConfig, RMConfig, SFTConfig, build_config, from_namespace,
                           parse_step_args, save_config, to_dict)
from chatrl.errors import ConfigError


def sft(*argv, out="out-test"):
    return parse_step_args("sft", ["--output_dir", str(out), *map(str, argv)])


# ----------------------------------------------------------------------------- spellings

@pytest.mark.parametrize("flag", ["--per_device_train_batch_size", "--per-device-train-batch-size"])
def test_snake_and_kebab_flags(flag):
    cfg = sft("--model_name_or_path", "tiny", flag, 3)
    assert cfg.per_device_train_batch_size == 3


def test_kebab_and_snake_everywhere():
    cfg = parse_step_args("sft", ["--model-name-or-path", "tiny", "--output-dir", "o",
                                  "--gradient_accumulation_steps", "4", "--lr-scheduler-type", "constant",
                                  "--data-path", "a.jsonl", "b.jsonl", "--data_weights", "1", "2.5",
                                  "--learning-rate", "2e-4", "max-seq-len=77", "num_warmup_steps=3"])
    assert (cfg.model_name_or_path, cfg.output_dir) == ("tiny", "o")
    assert (cfg.gradient_accumulation_steps, cfg.lr_scheduler_type) == (4, "constant")
    assert cfg.data_path == ["a.jsonl", "b.jsonl"] and cfg.data_weights == [1.0, 2.5]
    assert (cfg.learning_rate, cfg.max_seq_len, cfg.num_warmup_steps) == (2e-4, 77, 3)
    assert isinstance(cfg.max_seq_len, int) and isinstance(cfg.learning_rate, float)


@pytest.mark.parametrize("argv, value", [
    ([], False),
    (["--train_on_prompt"], True),
    (["--train-on-prompt"], True),
    (["--train_on_prompt", "true"], True),
    (["--train-on-prompt", "false"], False),
    (["--train_on_prompt", "0"], False),
    (["--no-train-on-prompt"], False),
    (["train_on_prompt=yes"], True),
    (["train-on-prompt=off"], False),
])
def test_bool_flags(argv, value):
    assert sft("--model_name_or_path", "tiny", *argv).train_on_prompt is value


def test_bad_values_are_config_errors():
    with pytest.raises(SystemExit):  # argparse: a choices violation
        sft("--model_name_or_path", "tiny", "--zero_stage", "4")
    with pytest.raises(ConfigError, match="train_on_prompt='maybe'"):
        sft("--model_name_or_path", "tiny", "train_on_prompt=maybe")
    with pytest.raises(ConfigError, match="per-device-train-batch-size must be >= 1"):
        sft("--model_name_or_path", "tiny", "--per_device_train_batch_size", "0")
    with pytest.raises(ConfigError, match="--output-dir is required"):
        build_config(SFTConfig, cli={"model_name_or_path": "tiny"})
    # key=value and config files get the flags' choices too (they used to pass unchecked)
    with pytest.raises(ConfigError, match=r"override 'zero_stage=4': zero_stage 4 is not one of 0, 1, 2, 3"):
        sft("--model_name_or_path", "tiny", "zero_stage=4")
    with pytest.raises(ConfigError, match=r"rollout_weights 'int8' is not one of same, fp16"):
        build_config(PPOConfig, overrides=["rollout_weights=int8"], validate=False)


# ----------------------------------------------------------------------------- precedence

@pytest.fixture
def layered(tmp_path, monkeypatch):
    """A private preset and two config files that each set some of the same fields."""
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "mine.yaml").write_text(yaml.safe_dump({
        "seed": 1,
        "sft": {"per_device_train_batch_size": 3, "max_seq_len": 100, "learning_rate": 0.1,
                "num_train_epochs": 5, "eval_iters": 7, "weight_decay": 0.05},
        "rm": {"rm_loss": "dschat"},  # another step's section: ignored by sft
    }))
    monkeypatch.setattr(C, "PRESET_DIR", presets)
    f1 = tmp_path / "one.yaml"
    f1.write_text(yaml.safe_dump({
        "eval_iters": 8, "weight_decay": 0.3,  # top level: beats the preset's section
        "sft": {"max_seq_len": 200, "learning_rate": 0.2, "num_train_epochs": 6,
                "weight_decay": 0.4},  # the section beats the same file's top level
    }))
    f2 = tmp_path / "two.yaml"
    f2.write_text(yaml.safe_dump({"sft": {"num_train_epochs": 9}}))
    return f1, f2


def test_precedence_defaults_preset_files_overrides_flags(layered):
    f1, f2 = layered
    cfg = parse_step_args("sft", ["--preset", "mine", "--config", str(f1), "--config", str(f2),
                                  "--output_dir", "o", "--learning_rate", "0.4",
                                  "max-seq-len=300", "learning_rate=0.3"])
    assert cfg.gradient_accumulation_steps == 1  # dataclass default
    assert cfg.per_device_train_batch_size == 3 and cfg.seed == 1  # preset (section, top level)
    assert cfg.eval_iters == 8  # file beats preset
    assert cfg.weight_decay == 0.4  # a file's step section beats its top level
    assert cfg.num_train_epochs == 9  # the later file wins
    assert cfg.max_seq_len == 300  # key=value beats files
    assert cfg.learning_rate == 0.4  # a flag beats everything
    # without the flag, the override wins; without the override, the file
    assert parse_step_args("sft", ["--preset", "mine", "--config", str(f1), "--output_dir", "o",
                                   "learning_rate=0.3"]).learning_rate == 0.3
    assert parse_step_args("sft", ["--preset", "mine", "--config", str(f1),
                                   "--output_dir", "o"]).learning_rate == 0.2
    assert parse_step_args("sft", ["--preset", "mine", "--output_dir", "o"]).learning_rate == 0.1
    # the rm section reached the rm step only
    assert parse_step_args("rm", ["--preset", "mine", "--output_dir", "o"]).rm_loss == "dschat"


def test_build_config_same_precedence(layered):
    f1, f2 = layered
    cfg = build_config(SFTConfig, preset="mine", files=[f1, f2], overrides=["max_seq_len=300"],
                       cli={"learning_rate": 0.4, "output_dir": "o"}, section="sft")
    assert (cfg.per_device_train_batch_size, cfg.eval_iters, cfg.num_train_epochs, cfg.max_seq_len,
            cfg.learning_rate) == (3, 8, 9, 300, 0.4)


# ----------------------------------------------------------------------------- cpu-default preset

def test_cpu_default_preset_applies_only_when_no_model_is_named(tmp_path):
    preset = yaml.safe_load((C.PRESET_DIR / "cpu-default.yaml").read_text())
    fields = ("per_device_train_batch_size", "max_seq_len", "learning_rate", "num_train_epochs")
    defaults = SFTConfig(output_dir="o")
    assert any(preset["sft"][k] != getattr(defaults, k) for k in fields)  # the test can tell

    plain = sft()
    assert plain.model_name_or_path is None
    for k in fields:
        assert getattr(plain, k) == preset["sft"][k], k
    assert plain.dtype == preset["dtype"]

    for argv in (["--model_name_or_path", "tiny"], ["--model-name-or-path", "tiny"],
                 ["model_name_or_path=tiny"]):
        named = sft(*argv)
        assert named.model_name_or_path == "tiny"
        for k in fields + ("dtype",):
            assert getattr(named, k) == getattr(defaults, k), (argv, k)

    # a config file also turns the automatic preset off ...
    f = tmp_path / "c.yaml"
    f.write_text("seed: 7\n")
    from_file = sft("--config", f)
    assert from_file.seed == 7 and from_file.per_device_train_batch_size == defaults.per_device_train_batch_size
    # ... and naming the preset applies it even with a model
    both = sft("--preset", "cpu-default", "--model_name_or_path", "tiny")
    assert both.model_name_or_path == "tiny"
    assert both.per_device_train_batch_size == preset["sft"]["per_device_train_batch_size"]


def test_default_output_folders_follow_deepspeed_chat_layout():
    assert parse_step_args("sft", []).output_dir == "output/actor-models/smollm2-135m-instruct"
    assert parse_step_args("sft", ["--model_name_or_path", "facebook/opt-1.3b"]).output_dir == \
        "output/actor-models/opt-1.3b"
    assert parse_step_args("rm", ["--model_name_or_path", "tiny"]).output_dir == "output/reward-models/tiny"
    ppo = parse_step_args("ppo", [])
    assert ppo.actor_model_name_or_path == "output/actor-models/smollm2-135m-instruct"
    assert ppo.critic_model_name_or_path == "output/reward-models/smollm2-135m-instruct"
    assert ppo.output_dir == "output/step3-models/smollm2-135m-instruct"


# ----------------------------------------------------------------------------- saved config

def test_saved_config_round_trips(tmp_path):
    cfg = sft("--model_name_or_path", "tiny", "--learning_rate", "3e-4", "--data_path", "demo", "x.jsonl",
              "--train_on_prompt", "--dropout", "0.0", "--lora_dim", "8", out=tmp_path / "run")
    path = tmp_path / "run_config.yaml"
    save_config(cfg, path)
    text = path.read_text()
    assert text.startswith("# resolved SFTConfig")
    saved = yaml.safe_load(text)
    assert saved == to_dict(cfg)
    assert set(saved) == {f.name for f in dataclasses.fields(SFTConfig)}  # every field
    # usable as --config: the same config comes back
    again = parse_step_args("sft", ["--config", str(path)])
    assert again == cfg
    rm = parse_step_args("rm", ["--config", str(path)])  # sft-only fields are ignored elsewhere
    assert rm.learning_rate == 3e-4 and rm.output_dir == str(tmp_path / "run")


# ----------------------------------------------------------------------------- DeepSpeed-Chat args

def dschat_step1_namespace() -> argparse.Namespace:
    """What DeepSpeed-Chat's step-1 main.py parse_args() returns (its names and defaults)."""
    return argparse.Namespace(
        data_path=["Dahoas/rm-static", "Dahoas/full-hh-rlhf"], data_split="6,2,2",
        sft_only_data_path=[], data_output_path="/tmp/data_files/",
        model_name_or_path="facebook/opt-1.3b", per_device_train_batch_size=8,
        per_device_eval_batch_size=8, max_seq_len=512, learning_rate=9.65e-6, weight_decay=0.0,
        num_train_epochs=16, gradient_accumulation_steps=1, lr_scheduler_type="cosine",
        num_warmup_steps=0, output_dir="./output", seed=1234, local_rank=-1,
        gradient_checkpointing=True, dropout=None, offload=False, dtype="bf16", zero_stage=3,
        lora_dim=128, lora_module_name="decoder.layers.", only_optimize_lora=False,
        lora_learning_rate=5e-4, compute_fp32_loss=False, enable_tensorboard=False,
        tensorboard_path="step1_tensorboard", add_eot_token=False, eot_token="<|endoftext|>",
        print_loss=True, deepspeed=True, deepspeed_config=None, deepscale=False)


def test_from_namespace_takes_deepspeed_chat_names():
    ns = dschat_step1_namespace()
    cfg = from_namespace(SFTConfig, ns)
    assert isinstance(cfg, SFTConfig)
    for k, v in vars(ns).items():
        if k in ("deepspeed", "deepscale"):
            assert not hasattr(cfg, k)  # unknown names are ignored (deepspeed_config is a field)
        elif v is None:
            assert getattr(cfg, k) == getattr(SFTConfig(), k), k  # None keeps the default
        else:
            assert getattr(cfg, k) == v, k
    # a mapping works too, values are coerced to the field types
    d = from_namespace(RMConfig, {"max_seq_len": "256", "learning_rate": "5e-6", "zero_stage": 2.0,
                                  "num_padding_at_beginning": 1, "data_path": "a.jsonl,b.jsonl"})
    assert (d.max_seq_len, d.learning_rate, d.zero_stage, d.num_padding_at_beginning) == (256, 5e-6, 2, 1)
    assert d.data_path == ["a.jsonl", "b.jsonl"]
    with pytest.raises(ConfigError, match="max_seq_len"):
        from_namespace(SFTConfig, {"max_seq_len": "long"})


def test_from_namespace_step3_names():
    ns = argparse.Namespace(
        actor_model_name_or_path="out/actor", critic_model_name_or_path="out/critic",
        num_padding_at_beginning=1, per_device_generation_batch_size=4,
        per_device_training_batch_size=4, generation_batches=1, ppo_epochs=1,
        max_answer_seq_len=256, max_prompt_seq_len=256, actor_learning_rate=9.65e-6,
        critic_learning_rate=5e-6, actor_weight_decay=0.0, critic_weight_decay=0.0,
        num_train_epochs=1, lr_scheduler_type="cosine", gradient_accumulation_steps=1,
        num_warmup_steps=100, seed=1234, actor_zero_stage=3, critic_zero_stage=3,
        enable_hybrid_engine=True, unpin_actor_parameters=False, release_inference_cache=False,
        inference_tp_size=1, tp_gather_partition_size=8, offload_reference_model=False,
        actor_lora_dim=0, critic_lora_dim=0, enable_ema=True, enable_mixed_precision_lora=False,
        actor_dropout=0.0, critic_dropout=None, output_dir="out/step3", dtype="fp16",
        unsupervised_dataset_name=None, unsup_coef=27.8, align_overflow=False,
        print_answers=False, enable_test_mode=False, test_stop_step=0)
    cfg = from_namespace(PPOConfig, ns)
    for k, v in vars(ns).items():
        assert getattr(cfg, k) == (getattr(PPOConfig(), k) if v is None else v), k


def test_ppo_generation_batch_must_fill_whole_optimizer_steps():
    """4 prompts per rollout, mini-batch 2 x accumulation 4 = 8 rows per optimizer step: the
    second half of a step would come from the next rollout (or from PTX). Refused, naming the
    numbers to change; multiples are accepted."""
    from chatrl.config import PPOConfig

    base = {"actor_model_name_or_path": "tiny", "critic_model_name_or_path": "tiny",
            "output_dir": "unused", "per_device_generation_batch_size": 4,
            "per_device_training_batch_size": 2}
    build_config(PPOConfig, cli={**base, "gradient_accumulation_steps": 2})
    with pytest.raises(ConfigError, match=r"--per-device-generation-batch-size 4 is not a multiple of "
                                          r"--per-device-training-batch-size 2 x "
                                          r"--gradient-accumulation-steps 4 = 8"):
        build_config(PPOConfig, cli={**base, "gradient_accumulation_steps": 4})
    with pytest.raises(ConfigError, match="multiple of"):
        build_config(PPOConfig, cli={**base, "per_device_training_batch_size": 3})
    # DeepSpeed-Chat's single-GPU step 3 (generation 16, micro-batch 16 x accumulation 2): the
    # error names the fix, two rollout batches per update, which is then accepted
    ds_chat = {**base, "per_device_generation_batch_size": 16, "per_device_training_batch_size": 16,
               "gradient_accumulation_steps": 2}
    with pytest.raises(ConfigError, match=r"collect --generation-batches 2 rollout batches per update"):
        build_config(PPOConfig, cli=ds_chat)
    build_config(PPOConfig, cli={**ds_chat, "generation_batches": 2})
    with pytest.raises(ConfigError, match=r"batch-size 16 x --generation-batches 3 is not a multiple .* = 32"):
        build_config(PPOConfig, cli={**ds_chat, "generation_batches": 3})
