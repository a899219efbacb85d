"""2 DeepSpeed ranks under ZeRO-3 equal 1 rank with the same global batch (CPU, gloo).

Launch form (what a user types, on CPU too):

    deepspeed --num_gpus 2 --master_port PORT --module chatrl sft ... --zero_stage 3

No hostfile is needed (the launcher falls back to localhost) and no environment beyond the usual:
without CUDA, DeepSpeed picks its CPU accelerator (tests/conftest.py also sets DS_ACCELERATOR=cpu)
and chatrl uses the gloo backend. The launcher passes `--local_rank=N` before the command, which
`chatrl` moves behind the step name. A free --master_port keeps concurrent runs apart.

Each 2-rank run is 2 steps: 2 ranks x micro-batch 2 against 1 rank x micro-batch 4 (ZeRO 0).
The first losses agree within 2e-6 relative (measured: ~1e-7), the second within 5e-6.
"""

from __future__ import annotations

import math

from pathlib import Path

import pytest
import torch
import yaml

from helpers import (TINY, assert_rel, chatrl, deepspeed_launcher, eval_rows, free_port,
                     safetensors_dir, train_rows)

if torch.cuda.is_available() and torch.cuda.device_count() < 2:
    pytest.skip("needs 2 GPUs (or none: then 2 CPU ranks)", allow_module_level=True)

COMMON = TINY + ["--max_steps", "2", "--learning_rate", "1e-3"]


def launch2(step: str, *args):
    port = free_port()
    launcher = [deepspeed_launcher(), "--num_gpus", "2", "--master_port", str(port),
                "--module", "chatrl"]
    result = chatrl(step, *args, launcher=launcher, timeout=400)
    # DeepSpeed's CPU all-reduce buffers (66 MB of RAM per rank) are gone once the ranks exit.
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    return result


def compare_runs(one, two, eval_keys):
    """Measured on CPU: the losses agree to ~1e-7 relative. Normalising by each rank's (or
    micro-batch's) own count instead of the global one moves step 2 by ~6e-5 relative on this
    setup (measured for micro-batches), so the step-2 bound stays well under that."""
    r1, r2 = train_rows(one), train_rows(two)
    assert [r["step"] for r in r1] == [r["step"] for r in r2] == [1, 2]
    assert_rel(r2[0]["loss"], r1[0]["loss"], 2e-6, "step 1 loss")
    assert_rel(r2[1]["loss"], r1[1]["loss"], 5e-6, "step 2 loss (after one update)")
    assert r2[0]["lr"] == pytest.approx(r1[0]["lr"], rel=1e-9)
    e1, e2 = eval_rows(one)[-1], eval_rows(two)[-1]
    # Both ranks' halves of the eval set add up to the 1-rank numbers. The eval runs after both
    # updates, and CPU kernels of different machine kinds reduce in a different order: the RM's
    # chosen_score differed by 9e-5 relative (0.3998727 vs 0.3998352) between 1 and 2 ranks on a
    # 2-core AVX2-only EPYC, ~1e-6 on an AVX512 one. A wrong split of the eval set (a row counted
    # twice or lost, a per-rank mean) moves these numbers by percents, so 1e-3 still catches it.
    for k in eval_keys:
        assert e2[k] == pytest.approx(e1[k], rel=1e-3, abs=1e-4), k


@pytest.fixture(scope="module")
def base_path():
    from chatrl.models import resolve_model_path

    return resolve_model_path("tiny")


@torch.no_grad()
def test_sft_zero3_two_ranks_equal_one_rank(tmp_path, base_path):
    from chatrl.models import load_causal_lm, load_tokenizer

    one, two = tmp_path / "one", tmp_path / "two"
    chatrl("sft", *COMMON, "--per_device_train_batch_size", "4", "--output_dir", one)
    proc = launch2("sft", *COMMON, "--per_device_train_batch_size", "2", "--zero_stage", "3",
                   "--output_dir", two)
    assert "dist_world_size=2" in proc.stdout + proc.stderr  # the launcher started 2 ranks
    # ... each with --local_rank=N before the command (rank 0 wrote the config)
    assert yaml.safe_load((two / "run_config.yaml").read_text())["local_rank"] == 0
    compare_runs(one, two, ["eval/loss"])
    assert eval_rows(two)[-1]["eval/tokens"] == eval_rows(one)[-1]["eval/tokens"]

    # The saved model was gathered from the ZeRO-3 partitions: full shapes, trained values.
    base, w1, w2 = (safetensors_dir(p) for p in (base_path, one / "model", two / "model"))
    assert set(w2) == set(w1) and set(base) <= set(w2)
    for k, t in base.items():
        assert w2[k].shape == t.shape and w2[k].numel() > 0, k
        assert not torch.equal(w2[k], t), f"{k} was not trained (or not gathered)"
        assert (w2[k] - w1[k]).abs().max() < 1e-4, k
    tok = load_tokenizer(str(two / "model"))
    m1 = load_causal_lm(str(one / "model"), tokenizer=tok).eval()
    m2 = load_causal_lm(str(two / "model"), tokenizer=tok).eval()
    x = tok(["<|im_start|>user\nWhat do you think about rain?<|im_end|>\n"], return_tensors="pt")
    l1, l2 = m1(**x).logits, m2(**x).logits
    assert torch.allclose(l1, l2, rtol=0, atol=1e-4), (l1 - l2).abs().max()


@torch.no_grad()
def test_rm_zero3_two_ranks_equal_one_rank(tmp_path, base_path):
    from chatrl.models import load_tokenizer
    from chatrl.models.reward import RewardModel

    one, two = tmp_path / "one", tmp_path / "two"
    chatrl("rm", *COMMON, "--per_device_train_batch_size", "4", "--output_dir", one)
    launch2("rm", *COMMON, "--per_device_train_batch_size", "2", "--zero_stage", "3",
            "--output_dir", two)
    compare_runs(one, two, ["eval/loss", "chosen_score", "rejected_score"])
    r1, r2 = train_rows(one), train_rows(two)
    assert [r["accuracy"] for r in r2] == [r["accuracy"] for r in r1]
    e1, e2 = eval_rows(one)[-1], eval_rows(two)[-1]
    assert e2["eval/pairs"] == e1["eval/pairs"] == 40 and e2["accuracy"] == e1["accuracy"]

    base = safetensors_dir(base_path)
    w2 = safetensors_dir(two / "model")
    assert {"model." + k: v.shape for k, v in w2.items()} == {k: v.shape for k, v in base.items()
                                                              if k != "lm_head.weight"}
    tok = load_tokenizer(str(two / "model"))
    a = RewardModel.from_pretrained(str(one / "model")).eval()
    b = RewardModel.from_pretrained(str(two / "model")).eval()
    assert b.v_head.weight.shape == (1, 64)
    assert (a.v_head.weight - b.v_head.weight).abs().max() < 1e-4
    enc = tok(["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nlovely day<|im_end|>"],
              return_tensors="pt")
    sa, sb = a.score(**enc), b.score(**enc)
    assert math.isfinite(sa.item()) and abs(sa.item() - sb.item()) < 1e-3 * max(1.0, abs(sa.item()))
