"""DeepSpeed-Chat compatibility at the argument level: DeepSpeed's own flags, the merge of a user's
DeepSpeed config file, and the translation of DeepSpeed-Chat's evaluation commands."""

import json
import os

import pytest

from chatrl.config import PPOConfig, parse_step_args
from chatrl.dschat import prompt_eval, rw_eval
from chatrl.dschat.args import apply_local_rank, pop_local_rank
from chatrl.engine.ds import EngineSpec, ds_config
from chatrl.engine.ds_user_config import merge_deepspeed_config, read_deepspeed_config
from chatrl.errors import ConfigError

BASE = ["--model_name_or_path", "tiny", "--output_dir", "out"]


@pytest.mark.parametrize("step", ["sft", "rm", "dpo", "ppo"])
def test_deepspeed_switches_are_accepted_by_every_step(step):
    models = (["--actor_model_name_or_path", "a", "--critic_model_name_or_path", "c"] if step == "ppo"
              else ["--model_name_or_path", "tiny"])
    cfg = parse_step_args(step, models + ["--output_dir", "out", "--deepspeed", "--deepscale",
                                          "--deepspeed_mpi", "--seed", "7"])
    assert cfg.seed == 7  # the switch before --seed took no value


def test_deepspeed_config_and_its_old_name(tmp_path):
    f = tmp_path / "ds.json"
    f.write_text('{"zero_optimization": {"stage": 2}}')
    assert parse_step_args("sft", BASE + ["--deepspeed_config", str(f)]).deepspeed_config == str(f)
    assert parse_step_args("sft", BASE + ["--deepscale_config", str(f)]).deepspeed_config == str(f)


@pytest.mark.parametrize("text, problem", [(None, "does not exist"), ("{not json", "is not valid JSON"),
                                           ("[1, 2]", "holds a JSON list")])
def test_a_bad_deepspeed_config_is_a_one_line_error(tmp_path, text, problem):
    f = tmp_path / "ds.json"
    if text is not None:
        f.write_text(text)
    with pytest.raises(ConfigError, match=problem):
        parse_step_args("sft", BASE + ["--deepspeed_config", str(f)])


@pytest.mark.parametrize("argv, rest, value", [
    (["--local_rank=3", "sft", "--seed", "1"], ["sft", "--seed", "1"], "3"),
    (["sft", "--seed", "1", "--local_rank", "2"], ["sft", "--seed", "1"], "2"),
    (["eval", "--local-rank=1", "reward"], ["eval", "reward"], "1"),
    (["chat", "--path", "x"], ["chat", "--path", "x"], None),
])
def test_local_rank_is_removed_wherever_it_is(argv, rest, value):
    assert pop_local_rank(argv) == (rest, value)


def test_local_rank_moves_behind_a_step_and_sets_LOCAL_RANK_once(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert apply_local_rank(["--local_rank=1", "sft", "--seed", "1"], keep_for=("sft",)) == \
        ["sft", "--local_rank=1", "--seed", "1"]
    assert os.environ["LOCAL_RANK"] == "1"
    assert apply_local_rank(["chat", "--local_rank", "0"], keep_for=("sft",)) == ["chat"]
    assert os.environ["LOCAL_RANK"] == "1"  # the launcher's value is kept


def test_every_flag_of_deepspeed_chats_step3_parser_is_a_config_field():
    # Flags of DeepSpeed-Chat's step-3 main.py that no training script uses.
    for name in ("preprocessing_num_workers", "unpin_actor_parameters", "release_inference_cache",
                 "offload_reward_model", "critic_dropout", "align_overflow", "print_answers_interval",
                 "unsupervised_dataset_name", "unsup_coef"):
        assert name in PPOConfig.__dataclass_fields__


# ----------------------------------------------------------------------------- the merge

def ours(**kw) -> dict:
    return ds_config(EngineSpec(**kw), world=1)


def test_offload_on_a_host_without_cuda_steps_with_torch_adamw():
    """--offload (in most DeepSpeed-Chat scripts) keeps DeepSpeed's offload layout, but without
    CUDA the optimizer already runs on the host: no DeepSpeedCPUAdam, whose JIT build costs ~80 s."""
    import torch

    from chatrl.engine.ds import _optimizer

    cfg = ours(zero_stage=3, offload=True)
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert cfg["zero_force_ds_cpu_optimizer"] is torch.cuda.is_available()
    opt = _optimizer([{"params": [torch.nn.Parameter(torch.zeros(2))]}],
                     EngineSpec(zero_stage=3, offload=True))
    if not torch.cuda.is_available():
        assert type(opt) is torch.optim.AdamW


def test_joining_the_process_group_on_a_cpu_host_builds_no_deepspeed_op():
    """DeepSpeed's CPU backend JIT-builds a shared-memory all-reduce op when the process group
    starts (40-80 s on a fresh machine, every first run), for tensor-parallel inference only.
    chatrl's collectives go through torch.distributed, so the op is neither built nor loaded."""
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA host: DeepSpeed's CUDA accelerator has no such op")
    code = ("from chatrl.engine import ds; ds.init_distributed(); import deepspeed.comm.comm as c; "
            "print('op:', c.cdb.shm_comm_op)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "op: None" in r.stdout and "built successfully" not in r.stdout + r.stderr


def _python(code: str) -> str:
    """stdout of `python -c CODE` in a fresh process (asserting it exits 0)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_a_zero_engine_with_chatrls_optimizer_compiles_no_muon_kernel():
    """DeepSpeed's ZeRO sanity check imports its Muon optimizer to put it on the supported list,
    and that import wraps Muon's kernels in torch.compile: the inductor back end loads, about 1.3 s
    in every rank of every ZeRO run (measured on a 2-core EPYC). chatrl's optimizers are on the
    list already, so no rank imports Muon; the check still refuses an optimizer off the list."""
    code = (
        "import sys, torch; from chatrl.engine import ds; ds.init_distributed()\n"
        "spec = ds.EngineSpec(zero_stage=2, micro_batch=1)\n"
        "engine = ds.build_engine(torch.nn.Linear(4, 4), spec)\n"
        "print('muon:', 'deepspeed.runtime.zero.muon.muon_optimizer' in sys.modules)\n"
        "print('inductor:', 'torch._inductor.compile_fx' in sys.modules)\n"
        "from deepspeed.runtime import engine as e\n"
        "class Odd(torch.optim.SGD): pass\n"
        "print('odd:', e.is_zero_supported_optimizer(Odd(torch.nn.Linear(2, 2).parameters(), lr=1)))\n")
    out = _python(code)
    assert "muon: False" in out and "inductor: False" in out and "odd: False" in out, out


def test_the_process_group_is_gone_before_the_interpreter_finalizes():
    """A chatrl process destroys its process group at exit while Python is still whole. Left to
    interpreter finalization, Gloo's threads can abort the process after its work is done: once in
    a suite run `chatrl sft --resume` printed its one-line error and then died of SIGABRT
    ("terminate called without an active exception"), exit status -6 instead of 2. An exit
    handler registered before the group starts runs after chatrl's (last in, first out)."""
    code = (
        "import atexit, torch.distributed as dist\n"
        "atexit.register(lambda: print('at exit, group alive:', dist.is_initialized(), flush=True))\n"
        "from chatrl.engine import ds; ds.init_distributed()\n"
        "print('started:', dist.is_initialized(), flush=True)\n")
    out = _python(code)
    assert "started: True" in out and "at exit, group alive: False" in out, out


def test_the_file_adds_what_chatrl_does_not_set():
    merged, notes = merge_deepspeed_config(ours(zero_stage=2), {
        "zero_optimization": {"reduce_bucket_size": 5e7, "stage": 2},
        "flops_profiler": {"enabled": True}})
    assert merged["zero_optimization"] == {**ours(zero_stage=2)["zero_optimization"],
                                           "reduce_bucket_size": 5e7}
    assert merged["flops_profiler"] == {"enabled": True}
    assert sorted(notes) == ["took flops_profiler={\"enabled\": true}",
                             "took zero_optimization.reduce_bucket_size=50000000.0"]


def test_chatrl_wins_where_both_set_a_value_and_says_which_flag():
    base = ours(zero_stage=0, micro_batch=4)
    merged, notes = merge_deepspeed_config(base, {"zero_optimization": {"stage": 3},
                                                  "train_micro_batch_size_per_gpu": 16,
                                                  "gradient_clipping": 1.0})
    assert merged == base  # gradient_clipping 1.0 is chatrl's own value too: no note
    assert sorted(notes) == sorted([
        "kept chatrl's train_micro_batch_size_per_gpu=4 over the file's 16 (set by "
        "--per_device_train_batch_size)",
        "kept chatrl's zero_optimization.stage=0 over the file's 3 (set by --zero_stage)"])


def test_optimizer_scheduler_and_auto_values_are_never_taken():
    base = ours()
    merged, notes = merge_deepspeed_config(base, {
        "optimizer": {"type": "AdamW", "params": {"lr": 1}}, "scheduler": {"type": "WarmupLR"},
        "train_batch_size": "auto", "zero_optimization": {"stage": "auto", "sub_group_size": "auto"}})
    assert merged == base
    assert len(notes) == 5 and all(n.startswith("ignored ") for n in notes)


def test_read_deepspeed_config_returns_the_object(tmp_path):
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"steps_per_print": 5}))
    assert read_deepspeed_config(f) == {"steps_per_print": 5}


# ----------------------------------------------------------------------------- evaluation commands

def test_rw_eval_maps_onto_chatrl_eval_reward():
    assert rw_eval.translate(["--model_name_or_path", "rm", "--num_padding_at_beginning", "1",
                              "--add_eot_token", "--data_path", "demo"]) == \
        ["eval", "reward", "--path", "rm", "--data_path", "demo"]


def test_prompt_eval_maps_onto_chatrl_eval_prompts_greedy():
    got = prompt_eval.translate(["--model_name_or_path_baseline", "a", "--model_name_or_path_finetune",
                                 "b", "--num_beams", "1", "--top_k", "4", "--penalty_alpha", "0.6",
                                 "--language", "English", "--max_new_tokens", "20"])
    assert got == ["eval", "prompts", "--base", "a", "--finetuned", "b", "--max-new-tokens", "20",
                   "--temperature", "0"]


def test_chatrl_train_takes_deepspeed_flags_for_every_step(tmp_path):
    from chatrl.pipeline import build_parser, plan_steps

    f = tmp_path / "ds.json"
    f.write_text('{"zero_optimization": {"reduce_bucket_size": 1000}}')
    args = build_parser().parse_args(["--actor-model", "tiny", "--deepspeed", "--deepspeed_config", str(f),
                                      "--output-dir", str(tmp_path)])
    plans = plan_steps(args)
    assert {name: cfg.deepspeed_config for name, cfg in plans.items()} == \
        {"sft": str(f), "rm": str(f), "ppo": str(f)}
