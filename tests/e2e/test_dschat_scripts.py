"""DeepSpeed-Chat's own training scripts, run as `chatrl sft|rm|dpo|ppo <their arguments>`.

The argument lists are tests/e2e/data/dschat_scripts.json: every script under DeepSpeed-Chat's
training/step*/training_scripts/ at commit 83757d9 (33), plus one parameter combination of each
sweep's run_single.sh (4), with the shell variables expanded (see the file's "derivation").

Each list runs through the real CLI as written, `--deepspeed` included, with only these
substitutions (dschat_helpers.script_argv):
- paths: --output_dir / --tensorboard_path -> a temporary folder; --model_name_or_path -> a tiny
  random model of the script's family (OPT -> tiny-opt, Llama-2 -> tiny-llama, BLOOM -> tiny-bloom,
  mGPT -> tiny-gpt2); step 3's actor and critic -> folders in DeepSpeed-Chat's own output layout
  (pytorch_model.bin, rwtransformer.* + v_head.weight) built from that tiny model;
- data: each hub dataset -> "<name>:<local JSONL in that dataset's schema>" (800 rows each, so
  the largest global batch, 8 x 16 accumulation, fits in step 1's 2/10 slice); the scripts that
  rely on DeepSpeed-Chat's default --data_path (Dahoas/rm-static) get it written out, because
  chatrl's default is its demo task;
- sizes: steps 1, 2 and DPO stop after one optimizer step (--max_steps 1; epochs, batch sizes and
  sequence lengths as written); step 3 runs one iteration in DeepSpeed-Chat's own test mode
  (--enable_test_mode --test_stop_step 1) with batch sizes and 256 + 256 tokens as written; the two
  single-GPU OPT scripts, whose generation batch is smaller than micro-batch x accumulation (an
  optimizer step over several rollouts), get --generation_batches k, which chatrl's refusal of
  such a configuration names (DeepSpeed-Chat mixes PTX and PPO micro-batches there);
- --progress false. Launchers (`deepspeed --num_gpus N`, `--master_port`, `--num_nodes`) are not
  reproduced: every list runs as one process; the flags are what is tested.

Checked for each: the run exits 0 and saves its model(s); the logged losses are finite; and every
flag of the list reached the step's resolved config (run_config.yaml) with the value given.

Default run: DEFAULT_SUBSET, which covers every flag used by the 37 lists and every step
(test_default_subset_covers_every_flag). CHATRL_SLOW=1 runs all 37.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import yaml

import dschat_helpers as H
from helpers import chatrl, train_rows

SCRIPTS = H.load_scripts()
DEFAULT_SUBSET = (
    "step1/opt/single_node/run_1.3b_lora.sh",       # only_optimize_lora
    "step2/llama2/run_llama2_7b_lora.sh",           # ZeRO-3 + offload + LoRA + grad. checkpointing
    "step2-dpo/opt/single_gpu/run_350m.sh",         # DPO; dropout; tensorboard flags
    "step3/llama2/run_llama2_7b_lora.sh",           # ZeRO-3 actor + critic LoRA, hybrid engine, ref offload
    "step3/opt/multi_node/run_66b.sh",              # inference_tp_size, tp_gather_partition_size
    "step3/opt/single_node/run_1.3b.sh",            # ZeRO-2, EMA
    "step3/opt/single_node/sweep/run_single.sh",    # print_answers, enable_mixed_precision_lora
)
SLOW = os.environ.get("CHATRL_SLOW") == "1"
STANDIN_ROWS = 800
NOT_CONFIG = {"deepspeed"}  # accepted and ignored (chatrl always trains through DeepSpeed)


def _params():
    for e in SCRIPTS:
        sid = H.script_id(e)
        skip = () if SLOW or sid in DEFAULT_SUBSET else pytest.mark.skip(
            reason="outside the default subset; CHATRL_SLOW=1 runs every script")
        yield pytest.param(e, id=sid, marks=skip)


@pytest.fixture(scope="module")
def standins(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("hub-standins")
    names = {H.DSCHAT_DEFAULT_DATA}
    for e in SCRIPTS:
        paths = H.flag_values(e["args"]).get("data_path", [])
        names.update([paths] if isinstance(paths, str) else paths)
    return {n: H.write_standin(folder, n, STANDIN_ROWS) for n in sorted(names)}


@pytest.fixture(scope="module")
def dschat_models(tmp_path_factory):
    """family -> (actor folder, critic folder) in DeepSpeed-Chat's layout, built on first use."""
    from chatrl.models import resolve_model_path

    root = tmp_path_factory.mktemp("dschat-models")
    built: dict[str, tuple[Path, Path]] = {}

    def get(family: str) -> tuple[Path, Path]:
        if family not in built:
            base = resolve_model_path(H.FAMILY_MODEL[family])
            built[family] = (H.make_dschat_actor(base, root / f"{family}-actor"),
                             H.make_dschat_reward(base, root / f"{family}-critic"))
        return built[family]
    return get


def _expected(value, current):
    """The script's string value converted like the config field it landed in."""
    if isinstance(current, bool):
        return True if value is True else str(value).lower() in ("1", "true")
    if isinstance(current, list):
        return [value] if isinstance(value, str) else list(value)
    if isinstance(current, (int, float)):
        return type(current)(float(value)) if isinstance(current, float) else int(value)
    return value


def test_the_data_file_lists_every_script():
    own = [e for e in SCRIPTS if "sweep_parameters" not in e]
    assert len(own) == 33 and len(SCRIPTS) == 37
    assert {e["step"] for e in SCRIPTS} == {"sft", "rm", "dpo", "ppo"}
    assert all("--deepspeed" in e["args"] for e in SCRIPTS)


def test_default_subset_covers_every_flag():
    ids = {H.script_id(e): e for e in SCRIPTS}
    assert set(DEFAULT_SUBSET) <= set(ids)
    used = set().union(*(H.flag_values(e["args"]) for e in SCRIPTS))
    covered = set().union(*(H.flag_values(ids[s]["args"]) for s in DEFAULT_SUBSET))
    assert used - covered == set()
    assert {ids[s]["step"] for s in DEFAULT_SUBSET} == {"sft", "rm", "dpo", "ppo"}


@pytest.mark.parametrize("entry", list(_params()))
def test_script_runs_as_written(entry, tmp_path, standins, dschat_models):
    from chatrl.models import resolve_model_path

    step = entry["step"]
    out = tmp_path / "out"
    actor = critic = None
    if step == "ppo":
        actor, critic = dschat_models(entry["family"])
    argv = H.script_argv(entry, output=out, model=resolve_model_path(H.FAMILY_MODEL[entry["family"]]),
                         actor=actor, critic=critic, data=standins)
    proc = chatrl(step, *argv, timeout=900)

    # 1. trained and saved
    rows = train_rows(out)
    assert rows, proc.stderr[-2000:]
    losses = ["loss/actor", "loss/critic"] if step == "ppo" else ["loss"]
    assert all(math.isfinite(r[k]) for r in rows for k in losses)
    if step == "ppo":
        assert (out / "actor" / "config.json").exists() and (out / "critic" / "config.json").exists()
        assert (out / "actor_ema" / "config.json").exists() == ("--enable_ema" in argv)
        assert "no trained value head" not in proc.stderr  # the DeepSpeed-Chat critic's head loaded
    else:
        assert (out / "model" / "config.json").exists()
        assert (out / "model" / "value_head.safetensors").exists() == (step == "rm")

    # 2. every flag reached the resolved config with the value given
    cfg = yaml.safe_load((out / "run_config.yaml").read_text())
    for name, value in H.flag_values(argv).items():
        if name in NOT_CONFIG:
            continue
        assert name in cfg, f"--{name} is not a config field"
        assert cfg[name] == _expected(value, cfg[name]), (name, value, cfg[name])
