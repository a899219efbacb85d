"""Steps 1 and 2 through the real `chatrl` command on the tiny random model (2 layers, hidden 64).

What is checked, each with exact or tight values:
- SFT: finite, decreasing losses; every parameter moved by an Adam-sized amount; the saved folder
  loads with plain Transformers (no missing/unexpected keys) and reproduces the logged eval loss;
  chatrl.json and run_config.yaml say what the run did.
- Prompt masking: label counts with and without --train-on-prompt.
- RM: finite loss; value head and backbone moved; loads back to identical scores; `chatrl eval
  reward` reports exactly the final eval row of metrics.jsonl.
- LoRA SFT: the saved folder is a plain model; only the LoRA-targeted weights differ from the base.
- Resume: a run SIGKILLed mid-training and resumed logs the uninterrupted run's losses.
- Batch 8 x accumulation 1 == batch 1 x accumulation 8.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from helpers import (TINY, assert_rel, chatrl, chatrl_killed_at, eval_rows, losses, lrs_used,
                     safetensors_dir, train_rows)

LR = 1e-3
STEPS = 6
# The reference SFT run: global batch 8, 6 steps, a checkpoint after step 3.
SFT_REF = TINY + ["--per_device_train_batch_size", "8", "--learning_rate", str(LR),
                  "--max_steps", str(STEPS), "--checkpoint_interval", "3"]


@pytest.fixture(scope="module")
def base_path() -> str:
    from chatrl.models import resolve_model_path

    return resolve_model_path("tiny")


@pytest.fixture(scope="module")
def sft_ref(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sft-ref")
    chatrl("sft", *SFT_REF, "--output_dir", out)
    return out


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rm")
    chatrl("rm", *TINY, "--per_device_train_batch_size", "8", "--learning_rate", str(LR),
           "--max_steps", str(STEPS), "--output_dir", out)
    return out


def _adam_bound(out_dir) -> float:
    """No weight can move further than about the sum of the learning rates of its updates
    (|Adam step| <~ lr); 2x leaves room for Adam's bias correction."""
    return 2.0 * sum(lrs_used(out_dir, LR))


# ----------------------------------------------------------------------------- (a) SFT

def test_sft_losses_parameters_and_outputs(sft_ref, base_path):
    rows = train_rows(sft_ref)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) and 0 < r["loss"] < 10 for r in rows), rows
    # The random model starts near log(vocab); lr 1e-3 visibly lowers the loss in 6 steps.
    assert math.log(476) - 0.5 < rows[0]["loss"] < math.log(476) + 0.5
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.1
    assert rows[0]["lr"] < LR and rows[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine to 0
    evals = eval_rows(sft_ref)
    assert len(evals) == 1 and evals[0]["step"] == STEPS and math.isfinite(evals[0]["eval/loss"])

    # Every trainable parameter changed, by an Adam-sized amount (tied embeddings: the saved
    # lm_head, if written, is the embedding matrix itself).
    base, saved = safetensors_dir(base_path), safetensors_dir(sft_ref / "model")
    assert set(base) <= set(saved) and set(saved) - set(base) <= {"lm_head.weight"}
    if "lm_head.weight" in saved:
        assert torch.equal(saved["lm_head.weight"], saved["model.embed_tokens.weight"])
    bound = _adam_bound(sft_ref)
    for name, t0 in base.items():
        t1 = saved[name]
        assert t1.shape == t0.shape and t1.dtype == torch.float32, name
        delta = (t1 - t0).abs()
        assert (delta > 0).float().mean() > 0.95, f"{name}: only part of the tensor was trained"
        assert 0.1 * LR < delta.max() <= bound, f"{name}: moved {delta.max():.3g} (bound {bound:.3g})"

    meta = json.loads((sft_ref / "model" / "chatrl.json").read_text())
    assert meta["kind"] == "causal_lm" and meta["step"] == "sft" and meta["template"] == "chat"
    assert meta["base_model"] == base_path
    assert meta["eval"]["eval/loss"] == evals[0]["eval/loss"]

    # The resolved config is saved beside the run (and inside the model folder), usable as
    # --config: loading it back gives the same config.
    text = (sft_ref / "run_config.yaml").read_text()
    assert (sft_ref / "model" / "run_config.yaml").read_text() == text
    assert text.startswith("# resolved SFTConfig")
    cfg = yaml.safe_load(text)
    assert cfg["model_name_or_path"] == "tiny" and cfg["output_dir"] == str(sft_ref)
    assert (cfg["per_device_train_batch_size"], cfg["max_steps"], cfg["checkpoint_interval"],
            cfg["learning_rate"], cfg["max_seq_len"], cfg["dropout"]) == (8, 6, 3, LR, 128, 0.0)
    assert cfg["data_path"] == ["demo"] and cfg["train_on_prompt"] is False
    from chatrl.config import SFTConfig, build_config, to_dict

    assert to_dict(build_config(SFTConfig, files=[sft_ref / "run_config.yaml"], section="sft")) == cfg


def _sft_eval_rows(tokenizer, cache_root):
    from chatrl.data import build_step_data, tokenize_step_data

    raw = build_step_data(["demo"], "2,4,4", 1, seed=1234)
    ds, _ = tokenize_step_data(raw.eval, tokenizer, step="sft", template="chat", max_seq_len=128,
                               cache_root=cache_root)
    return [ds[i] for i in range(len(ds))]


@torch.no_grad()
def test_sft_saved_model_loads_and_reproduces_the_logged_eval_loss(sft_ref, tmp_path):
    from transformers import AutoModelForCausalLM

    from chatrl.data import collate_sft
    from chatrl.models import load_causal_lm, load_tokenizer
    from chatrl.rl import sft_loss, token_counts

    folder = sft_ref / "model"
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    model.eval()
    tok = load_tokenizer(str(folder))
    assert tok.pad_token_id != tok.eos_token_id
    ours = load_causal_lm(str(folder), tokenizer=tok).eval()

    # The saved weights are the ones the engine evaluated at the end: recomputing the eval loss
    # on the same held-out rows gives the logged value.
    rows = _sft_eval_rows(tok, tmp_path)
    assert len(rows) == 20
    assert all(r["input_ids"][-1] == tok.eos_token_id for r in rows)  # none cut at 128 tokens
    nll, count = 0.0, 0
    for i in range(0, len(rows), 16):
        b = collate_sft(rows[i:i + 16], tok.pad_token_id)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        assert torch.equal(logits, ours(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits)
        nll += sft_loss(logits.float(), b["labels"], reduction="sum").item()
        count += int(token_counts(b["labels"]).sum())
    final = eval_rows(sft_ref)[-1]
    assert count == final["eval/tokens"]
    assert_rel(nll / count, final["eval/loss"], 1e-5, "eval loss of the saved model")


# ----------------------------------------------------------------------------- (b) prompt masking

def test_prompt_masking_label_counts(tiny_tokenizer, tmp_path):
    from chatrl.data import collate_sft
    from chatrl.rl import token_counts
    from chatrl.steps.sft import label_tokens

    rows = [r for r in _sft_eval_rows(tiny_tokenizer, tmp_path) if len(r["input_ids"]) < 128][:6]
    assert len(rows) == 6  # rows not cut at max_seq_len 128, so each ends with its EOS
    pad = tiny_tokenizer.pad_token_id
    masked = collate_sft(rows, pad, train_on_prompt=False)
    full = collate_sft(rows, pad, train_on_prompt=True)
    for i, r in enumerate(rows):
        n, p = len(r["input_ids"]), int(r["prompt_len"])
        assert 0 < p < n
        ids = torch.tensor(r["input_ids"])
        # train_on_prompt false: exactly the response tokens (+ EOS) are labels
        assert torch.all(masked["labels"][i, :p] == -100)
        assert torch.equal(masked["labels"][i, p:n], ids[p:])
        assert torch.all(masked["labels"][i, n:] == -100)
        assert int((masked["labels"][i] != -100).sum()) == n - p
        assert ids[-1] == tiny_tokenizer.eos_token_id and masked["labels"][i, n - 1] == ids[-1]
        # train_on_prompt true: every real token is a label; padding never is
        assert torch.equal(full["labels"][i, :n], ids)
        assert int((full["labels"][i] != -100).sum()) == n
        # what the loop divides by (predicted tokens after the shift)
        assert int(token_counts(masked["labels"][i:i + 1])) == label_tokens(r, False) == n - p
        assert int(token_counts(full["labels"][i:i + 1])) == label_tokens(r, True) == n - 1


# ----------------------------------------------------------------------------- (c) reward model

def test_rm_trains_head_and_backbone(rm_run, base_path):
    from safetensors.torch import load_file

    from chatrl.engine.ds import seed_everything
    from chatrl.models import load_tokenizer
    from chatrl.models.reward import RewardModel

    rows = train_rows(rm_run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        assert math.isfinite(r["loss"]) and 0 < r["loss"] < 5
        assert r["accuracy"] * 8 == pytest.approx(round(r["accuracy"] * 8), abs=1e-9)  # k of 8 pairs
    # A fresh value head: the first pairwise loss is close to log 2.
    assert abs(rows[0]["loss"] - math.log(2)) < 0.3

    # The step's starting point, rebuilt the way the step builds it (same seed, same order).
    seed_everything(1234)
    start = RewardModel.from_pretrained(base_path, dtype="fp32", tokenizer=load_tokenizer(base_path))
    head0 = start.v_head.weight.detach()
    head1 = load_file(str(rm_run / "model" / "value_head.safetensors"))["weight"]
    bound = _adam_bound(rm_run)
    assert head1.shape == head0.shape == (1, 64)
    dh = (head1 - head0).abs()
    assert (dh > 0).all() and 0.1 * LR < dh.max() <= bound, (dh.max(), bound)

    base, saved = safetensors_dir(base_path), safetensors_dir(rm_run / "model")
    # The backbone is saved as a plain AutoModel (no lm_head, no "model." prefix).
    assert set(saved) == {k[len("model."):] for k in base}
    for name, t1 in saved.items():
        delta = (t1 - base["model." + name]).abs()
        assert (delta > 0).any(), f"{name} did not change"
        assert delta.max() <= bound, (name, delta.max(), bound)
        if "embed" not in name:  # embedding rows of tokens no batch held get no gradient
            assert (delta > 0).float().mean() > 0.95, name


@torch.no_grad()
def test_rm_reloads_identically_and_eval_reward_matches_metrics(rm_run, capsys):
    from chatrl.cli import main
    from chatrl.models import load_tokenizer
    from chatrl.models.reward import RewardModel

    folder = str(rm_run / "model")
    tok = load_tokenizer(folder)
    enc = tok(["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nlovely<|im_end|>",
               "<|im_start|>user\nrain?<|im_end|>\n<|im_start|>assistant\nawful, bad rain<|im_end|>"],
              return_tensors="pt", padding=True)
    a = RewardModel.from_pretrained(folder).eval()
    b = RewardModel.from_pretrained(folder).eval()
    sa, sb = a.score(enc["input_ids"], enc["attention_mask"]), b.score(enc["input_ids"], enc["attention_mask"])
    assert torch.equal(sa, sb) and sa.shape == (2,) and torch.isfinite(sa).all()
    assert sa[0] != sa[1]
    meta = json.loads((rm_run / "model" / "chatrl.json").read_text())
    assert meta["kind"] == "reward_model" and meta["step"] == "rm"

    # `chatrl eval reward` (the real command, in-process) scores the same held-out pairs with
    # the saved model: exactly the accuracy of the run's final eval row.
    capsys.readouterr()
    assert main(["eval", "reward", "--path", folder, "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    final = eval_rows(rm_run)[-1]
    assert final["step"] == STEPS
    assert res["eval/pairs"] == final["eval/pairs"] == 40
    assert res["accuracy"] == final["accuracy"]
    assert_rel(res["chosen_score"], final["chosen_score"], 1e-6, "chosen score")
    assert_rel(res["rejected_score"], final["rejected_score"], 1e-6, "rejected score")
    assert_rel(res["eval/loss"], final["eval/loss"], 1e-6, "eval loss")


# ----------------------------------------------------------------------------- (d) LoRA

def test_lora_sft_saves_a_plain_merged_model(tmp_path, base_path):
    from transformers import AutoModelForCausalLM

    from chatrl.models.lora import lora_targets

    out = tmp_path / "lora"
    chatrl("sft", *TINY, "--per_device_train_batch_size", "8", "--max_steps", "2",
           "--lora_dim", "4", "--only_optimize_lora", "--lora_learning_rate", "1e-2",
           "--output_dir", out)
    assert all(math.isfinite(x) for x in losses(out)) and len(losses(out)) == 2
    saved, base = safetensors_dir(out / "model"), safetensors_dir(base_path)
    assert not [k for k in saved if "lora" in k or "base_layer" in k]
    assert set(base) <= set(saved) and set(saved) - set(base) <= {"lm_head.weight"}
    model, info = AutoModelForCausalLM.from_pretrained(out / "model", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info

    targets = {f"{n}.weight" for n in lora_targets(AutoModelForCausalLM.from_pretrained(base_path))}
    assert len(targets) == 14  # q k v o gate up down x 2 layers
    for name, t0 in base.items():
        if name in targets:  # merged W + B A: the adapters learned something
            assert (saved[name] - t0).abs().max() > 1e-4, f"{name}: LoRA delta missing"
        else:  # --only_optimize_lora: embeddings and norms are frozen, bit for bit
            assert torch.equal(saved[name], t0), f"{name} changed although only LoRA trains"


# ----------------------------------------------------------------------------- (e) resume

def test_resume_after_kill_reproduces_the_remaining_losses(sft_ref, tmp_path):
    out = tmp_path / "killed"
    args = ["sft", *SFT_REF, "--output_dir", out]
    proc = chatrl_killed_at(5, *args)  # SIGKILL while step 5 is being logged
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert not (out / "model").exists()
    assert [r["step"] for r in train_rows(out)] == [1, 2, 3, 4]
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-000003"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step-000003"]  # no temp
    state = json.loads((ckpts / "step-000003" / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (3, 0, 3)
    ref = train_rows(sft_ref)
    assert_rel(train_rows(out)[3]["loss"], ref[3]["loss"], 1e-6, "killed run, step 4")

    proc = chatrl(*args, "--resume")
    assert "resumed from" in proc.stderr and "at step 3 (epoch 0, batch 3)" in proc.stderr, proc.stderr
    rows = train_rows(out)
    # The killed run's rows after its checkpoint (step 4) are dropped and redone: one row a step.
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for got, want in zip(rows[3:], ref[3:]):
        assert_rel(got["loss"], want["loss"], 1e-5, f"resumed step {want['step']}")
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-9, abs=1e-15)
    assert_rel(eval_rows(out)[-1]["eval/loss"], eval_rows(sft_ref)[-1]["eval/loss"], 1e-5, "final eval")
    a, b = safetensors_dir(out / "model"), safetensors_dir(sft_ref / "model")
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-6), k


# ----------------------------------------------------------------------------- (f) accumulation

def test_batch8_equals_batch1_times_accumulation8(sft_ref, tmp_path):
    """Measured on CPU: the two runs agree to ~2e-8 relative. Normalising each micro-batch by its
    own token count (DeepSpeed-Chat's per-micro-batch mean) moves the step-2 loss by ~6e-5
    relative here, so the step-2 bound must be well under 1e-4 to catch that."""
    # Two steps: the loss of step 2 is taken after one update at the peak learning rate, which
    # does not depend on the schedule's length, so the 6-step reference run is comparable.
    out = tmp_path / "accum"
    chatrl("sft", *TINY, "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "8",
           "--learning_rate", str(LR), "--max_steps", "2", "--output_dir", out)
    got, want = losses(out), losses(sft_ref)
    assert len(got) == 2
    assert_rel(got[0], want[0], 1e-6, "step 1 (same weights, same rows)")
    assert_rel(got[1], want[1], 5e-6, "step 2 (after one update)")
    assert got[1] < got[0] - 0.01  # the update did something, so step 2 compares the updates
