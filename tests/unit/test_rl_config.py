"""`chatrl grpo` / `chatrl rl` options: presets of orthogonal choices, defaults, one-line errors."""

import pytest

from chatrl.config import PPOConfig, RLConfig, parse_step_args
from chatrl.errors import ConfigError


def parse(*argv, step="grpo"):
    return parse_step_args(step, ["--output_dir", "/tmp/unused", *map(str, argv)])


def test_grpo_with_no_arguments_is_the_arithmetic_task_on_the_embedded_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no step-1 output here (see the next test)
    cfg = parse()
    algo = cfg.algorithm()
    assert cfg.data_path == ["arith"] and cfg.actor_model_name_or_path == "default"
    assert cfg.critic_model_name_or_path is None and cfg.reward_fn == []
    # the cpu-default preset's knobs on top of GRPO (configs/cpu-default.yaml)
    assert (algo.name, algo.estimator, algo.num_generations, algo.kl_coef) == ("grpo", "grpo", 8, 0.04)
    assert (algo.aggregation, cfg.temperature) == ("token_mean", 0.7)
    assert cfg.eval_prompts >= 100 and cfg.eval_samples == 0


def test_grpo_with_no_model_continues_from_the_default_sft_output(tmp_path, monkeypatch):
    """`chatrl sft` then `chatrl grpo`: step 1's default output is the policy, as for `chatrl ppo`;
    a model named on the command line (even "default") wins."""
    monkeypatch.chdir(tmp_path)
    assert parse().actor_model_name_or_path == "default"  # no step-1 output yet
    model = tmp_path / "output" / "actor-models" / "smollm2-135m-instruct" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    cfg = parse()
    assert cfg.actor_model_name_or_path == "output/actor-models/smollm2-135m-instruct/model"
    assert cfg.data_path == ["arith"] and cfg.eval_prompts > 0  # still the no-argument preset
    assert parse("--actor_model_name_or_path", "default").actor_model_name_or_path == "default"


def test_algorithm_presets_and_flags_on_top():
    algo = parse("--actor_model_name_or_path", "tiny", "--algo", "dapo", "--clip-high", "0.3",
                 "--max_answer_seq_len", "40").algorithm()
    assert (algo.clip_low, algo.clip_high, algo.dynamic_sampling, algo.overlong_buffer) == (0.2, 0.3, True, 10)
    algo = parse("--actor_model_name_or_path", "tiny", "--scale-rewards", "false", "--loss-aggregation",
                 "seq_mean_token_sum_norm", "--kl_coef", "0.04").algorithm()
    assert not algo.scale_std and algo.aggregation == "seq_mean_token_sum_norm" and algo.kl_in_loss
    # --cliprange sets both sides unless one is given
    algo = parse("--actor_model_name_or_path", "tiny", "--cliprange", "0.1", "--clip-low", "0.05").algorithm()
    assert (algo.clip_low, algo.clip_high) == (0.05, 0.05)
    assert parse("--actor_model_name_or_path", "tiny", "--cliprange", "0.1").algorithm().clip_high == 0.1
    cfg = parse("--actor_model_name_or_path", "tiny", "--reward_fn", "numeric", "format",
                "--reward_weights", "1", "0.5")
    assert cfg.reward_fn == ["numeric", "format"] and cfg.reward_weights == [1.0, 0.5]


def test_ppo_keeps_its_defaults_and_needs_a_critic():
    cfg = PPOConfig(actor_model_name_or_path="a", critic_model_name_or_path="c", output_dir="o")
    algo = cfg.algorithm()
    assert (algo.estimator, algo.num_generations, algo.kl_coef, algo.kl_placement, algo.whiten) == \
        ("gae", 1, 0.1, "reward", True)
    assert cfg.eval_prompts == 0
    with pytest.raises(ConfigError, match="--critic-model-name-or-path is required"):
        RLConfig(algo="ppo", output_dir="o").validate()
    RLConfig(algo="rloo", output_dir="o").validate()  # critic-free: no critic needed


@pytest.mark.parametrize("argv,message", [
    (["--algo", "rloo", "--num_generations", "1"], "rloo estimator compares the answers to one prompt"),
    (["--advantage_estimator", "vtrace"], "estimator 'vtrace' is not one of gae, grpo, rloo, reinforce_pp"),
    (["--ratio_level", "word"], "ratio_level 'word' is not one of token, sequence"),
    (["--kl_placement", "both"], "kl_placement 'both' is not one of none, reward, loss"),
    (["--clip_low", "1.5"], "clip_low must be in (0, 1)"),
    (["--eval_samples", "-1"], "--eval-samples is -1; it must be >= 0"),
])
def test_inconsistent_choices_are_one_line_errors(argv, message):
    with pytest.raises(ConfigError) as e:
        parse("--actor_model_name_or_path", "tiny", *argv)
    assert message in str(e.value), str(e.value)
    assert "\n" not in str(e.value)
