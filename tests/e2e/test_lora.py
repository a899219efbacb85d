"""LoRA through the real CLI: which weights train, in SFT, RM, and PPO's actor and critic.

DeepSpeed-Chat's meaning of the flags:
- `--lora-dim N` alone: adapters are added AND the base weights, embeddings, norms and (reward
  model, critic) value head still train;
- with `--only-optimize-lora`: the adapters train, and a reward model's / critic's value head;
  every other weight is frozen bit for bit.

Saved folders hold merged weights W + s * B @ A, so the adapters' own tensors are not visible. The
check per weight matrix uses the rank of (saved - start): an adapter adds a delta of rank <= N,
a trained base weight adds a full-rank Adam update. So with --only-optimize-lora every adapted
matrix moved by a non-zero delta of rank <= N (the adapters learned, the base under them did
not) and every other tensor is bit-identical; without it every tensor moved and the adapted
matrices moved by more than rank N. The value head (its own file) must move in both modes.
The reward-model start is a saved RewardModel folder with a known value head.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ppo_helpers import PPO_FAST, PYTHON, start, state_dict_of, wait_all

RANK = 4
STEP12 = ["--max_seq_len", "64", "--per_device_train_batch_size", "4", "--max_steps", "3",
          "--progress", "false", "--enable_tensorboard", "false", "--eval_iters", "1", "--dtype", "fp32",
          "--learning_rate", "1e-3", "--lora_dim", str(RANK), "--lora_learning_rate", "1e-2"]
PPO = [*PPO_FAST, "--max_steps", "2", "--actor_learning_rate", "1e-3", "--critic_learning_rate", "1e-3",
       "--actor_lora_dim", str(RANK), "--critic_lora_dim", str(RANK),
       "--actor_lora_learning_rate", "1e-2", "--critic_lora_learning_rate", "1e-2"]
# s_(RANK+1) / s_1 of (saved - start) for an adapted matrix. Frozen base: fp32 round-off of
# W + s*B@A only (measured 5e-8 to 1.3e-7); trained base: a full-rank Adam update on top of the
# adapter's delta (measured 0.08 to 0.39).
LOW_RANK_MAX = 1e-5
FULL_RANK_MIN = 1e-2


def _rm_start(root: Path) -> str:
    """A saved reward model (tiny-llama backbone) whose value head is known."""
    from chatrl.models import load_tokenizer, resolve_model_path
    from chatrl.models.reward import RewardModel

    base = resolve_model_path("tiny")
    tok = load_tokenizer(base)
    rm = RewardModel.from_pretrained(base, tokenizer=tok)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        rm.v_head.weight.copy_(torch.randn(rm.v_head.weight.shape, generator=g) * 0.1)
    out = root / "rm-start"
    rm.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from chatrl.models import resolve_model_path

    tmp = tmp_path_factory.mktemp("lora")
    base = resolve_model_path("tiny")
    rm_start = _rm_start(tmp)
    only = ["--only_optimize_lora"]
    cmds = {
        "sft_full": ["sft", "--model_name_or_path", base, *STEP12],
        "sft_only": ["sft", "--model_name_or_path", base, *STEP12, *only],
        "rm_full": ["rm", "--model_name_or_path", rm_start, *STEP12],
        "rm_only": ["rm", "--model_name_or_path", rm_start, *STEP12, *only],
        "ppo_full": ["ppo", "--actor_model_name_or_path", base, "--critic_model_name_or_path", rm_start, *PPO],
        "ppo_only": ["ppo", "--actor_model_name_or_path", base, "--critic_model_name_or_path", rm_start,
                     *PPO, *only],
    }
    names = list(cmds)
    for group in (names[:3], names[3:]):  # three at a time: each run is mostly start-up
        procs = {n: start([PYTHON, "-m", "chatrl", *cmds[n], "--output_dir", tmp / n], tmp, n)
                 for n in group}
        wait_all(procs)
    return SimpleNamespace(out=tmp, base=base, rm_start=rm_start)


def _targets(folder: Path, reward: bool) -> set[str]:
    """Names of the saved weight matrices that carried an adapter."""
    from transformers import AutoModel, AutoModelForCausalLM

    from chatrl.models.lora import lora_targets

    model = (AutoModel if reward else AutoModelForCausalLM).from_pretrained(folder)
    return {f"{n}.weight" for n in lora_targets(model)}


def _rank_ratio(delta: torch.Tensor) -> float:
    s = torch.linalg.svdvals(delta.double())
    return (s[RANK] / s[0]).item()


def check(saved_dir: Path, start_dir: str, only: bool, reward: bool) -> None:
    saved, start_w = state_dict_of(saved_dir), state_dict_of(start_dir)
    assert not [k for k in saved if "lora_" in k or "base_layer" in k]
    assert set(start_w) <= set(saved) and set(saved) - set(start_w) <= {"lm_head.weight"}
    targets = _targets(Path(saved_dir), reward)
    assert len(targets) == 14 and targets <= set(start_w)  # q k v o gate up down x 2 layers
    for name, w0 in start_w.items():
        w = saved[name]
        if name in targets:
            assert not torch.equal(w, w0), f"{name}: neither adapter nor base weight trained"
            ratio = _rank_ratio(w - w0)
            if only:  # the adapter's low-rank delta alone: the base under it stayed frozen
                assert ratio < LOW_RANK_MAX, f"{name}: delta has rank > {RANK} ({ratio:.2e})"
            else:  # the base weight trained too
                assert ratio > FULL_RANK_MIN, f"{name}: only a rank-{RANK} delta ({ratio:.2e})"
        elif only:
            assert torch.equal(w, w0), f"{name} changed although only LoRA trains"
        else:
            assert not torch.equal(w, w0), f"{name} did not train (LoRA without --only-optimize-lora)"
    if reward:
        from safetensors.torch import load_file

        head, head0 = (load_file(str(Path(d) / "value_head.safetensors"))["weight"]
                       for d in (saved_dir, start_dir))
        assert not torch.equal(head, head0), "the value head did not train"


@pytest.mark.parametrize("only", [False, True], ids=["lora", "only-lora"])
def test_sft(runs, only):
    check(runs.out / f"sft_{'only' if only else 'full'}" / "model", runs.base, only, reward=False)


@pytest.mark.parametrize("only", [False, True], ids=["lora", "only-lora"])
def test_rm(runs, only):
    from chatrl.models.reward import RewardModel

    folder = runs.out / f"rm_{'only' if only else 'full'}" / "model"
    check(folder, runs.rm_start, only, reward=True)
    RewardModel.from_pretrained(str(folder))  # loads back


@pytest.mark.parametrize("only", [False, True], ids=["lora", "only-lora"])
def test_ppo_actor_and_critic(runs, only):
    out = runs.out / f"ppo_{'only' if only else 'full'}"
    check(out / "actor", runs.base, only, reward=False)
    check(out / "critic", runs.rm_start, only, reward=True)
