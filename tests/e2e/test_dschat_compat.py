"""What a DeepSpeed-Chat user brings along: DeepSpeed's flags, a DeepSpeed config file, the
local/jsonfile data layout, and model folders in DeepSpeed-Chat's layout (in and out).

"Identical scores" for a DeepSpeed-Chat reward model means: for the same token ids, chatrl's score
(RewardModel.score: the value at the last non-pad token, which for an answer ending in EOS is
read one token earlier, as DeepSpeed-Chat did) equals DeepSpeed-Chat's step-3 score rule applied
to the values of its own backbone + v_head (dschat_helpers.dschat_end_scores) to within 1e-6
(fp32; the same weights and positions, the only difference being the padding of the batch).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import dschat_helpers as H
from helpers import TINY, chatrl, safetensors_dir, train_rows

TOL = 1e-6


@pytest.fixture(scope="module")
def bases():
    from chatrl.models import resolve_model_path

    return {fam: resolve_model_path(H.FAMILY_MODEL[fam]) for fam in ("opt", "llama")}


def _batch(tok, texts: list[tuple[str, str]], eos: bool, pad_id: int):
    """prompt + answer (+ EOS) token rows, right-padded with `pad_id`; (ids, mask)."""
    rows = []
    for prompt, answer in texts:
        ids = tok(prompt + " " + answer, add_special_tokens=False)["input_ids"]
        rows.append(ids + ([tok.eos_token_id] if eos else []))
    n = max(map(len, rows))
    ids = torch.tensor([r + [pad_id] * (n - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows])
    return ids, mask


TEXTS = [("Human: Tell me about the ocean. Assistant:", "The ocean is wonderful and full of life!"),
         ("Human: What do you think of rain? Assistant:", "Rain is lovely."),
         ("Human: Describe a mountain. Assistant:", "Tall.")]


# ----------------------------------------------------------------------------- flags

def test_deepspeed_flags_anywhere_and_a_deepspeed_config_file(tmp_path):
    """`--local_rank` before the command and after it, `--deepspeed`, and a DeepSpeed config file:
    what chatrl does not set is taken (the flops profiler writes its report: the key reached the
    engine), what chatrl sets wins, optimizer sections are ignored, each decision is logged."""
    profile = tmp_path / "flops.txt"
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({
        "flops_profiler": {"enabled": True, "profile_step": 1, "module_depth": 1, "top_modules": 1,
                           "detailed": False, "output_file": str(profile)},
        "zero_optimization": {"stage": 3, "reduce_bucket_size": 50000000},
        "train_micro_batch_size_per_gpu": 16, "optimizer": {"type": "Adam", "params": {"lr": 0.1}}}))
    out = tmp_path / "sft"
    proc = chatrl("--local_rank=0", "sft", *TINY, "--per_device_train_batch_size", "4", "--max_steps", "2",
                  "--deepspeed", "--deepscale", "--deepspeed_mpi", "--deepspeed_config", ds_json,
                  "--output_dir", out, "--local_rank", "0")
    log = [line.split(": ", 1)[1] for line in proc.stderr.splitlines() if line.startswith("--deepspeed_config")]
    assert sorted(log) == sorted([
        "took flops_profiler=" + json.dumps(json.loads(ds_json.read_text())["flops_profiler"]),
        "took zero_optimization.reduce_bucket_size=50000000",
        "kept chatrl's zero_optimization.stage=0 over the file's 3 (set by --zero_stage)",
        "kept chatrl's train_micro_batch_size_per_gpu=4 over the file's 16 (set by "
        "--per_device_train_batch_size)",
        "ignored optimizer (chatrl builds AdamW from --learning_rate and --weight_decay)"])
    assert "Flops Profiler" in profile.read_text()
    assert len(train_rows(out)) == 2


# ----------------------------------------------------------------------------- data

def test_local_jsonfile_and_sft_only_data_path(tmp_path, monkeypatch):
    """`--data_path local/jsonfile` reads data/train.json and data/eval.json under the current
    folder (prompts with DeepSpeed-Chat's " Human: ... Assistant:" turns); the rows of
    `--sft_only_data_path` all go to step 1 on top of its 2/10 slice."""
    from chatrl.data import build_step_data

    (tmp_path / "data").mkdir()
    rows = [{"prompt": f" Human: What is {i} plus one? Assistant:", "chosen": f"It is {i + 1}.",
             "rejected": "No idea."} for i in range(60)]
    (tmp_path / "data" / "train.json").write_text(json.dumps(rows[:50]))
    (tmp_path / "data" / "eval.json").write_text("".join(json.dumps(r) + "\n" for r in rows[50:]))
    sft_only = tmp_path / "sft_only.jsonl"
    sft_only.write_text("".join(json.dumps({"prompt": f"Say {i}.", "response": f"{i}."}) + "\n"
                                for i in range(30)))
    monkeypatch.chdir(tmp_path)
    slice_rows = len(build_step_data(["local/jsonfile"], "2,4,4", 1).train)
    first = build_step_data(["local/jsonfile"], "2,4,4", 1).train[0]
    assert first["messages"][0]["role"] == "user" and "Human:" not in first["messages"][0]["content"]

    proc = chatrl("sft", *TINY, "--data_path", "local/jsonfile", "--sft_only_data_path", sft_only,
                  "--per_device_train_batch_size", "4", "--max_steps", "1", "--output_dir", tmp_path / "sft")
    assert f"sft: {slice_rows + 27} training rows" in proc.stderr  # 30 rows -> 27 train, 3 eval (9:1)
    proc = chatrl("rm", *TINY, "--data_path", "local/jsonfile", "--per_device_train_batch_size", "4",
                  "--max_steps", "1", "--output_dir", tmp_path / "rm")
    assert (tmp_path / "rm" / "model" / "value_head.safetensors").exists()


# ----------------------------------------------------------------------------- checkpoints in

@pytest.mark.parametrize("family", ["opt", "llama"])
def test_dschat_reward_model_scores_as_in_dschat(tmp_path, bases, family):
    from chatrl.models import load_tokenizer
    from chatrl.models.reward import RewardModel

    folder = H.make_dschat_reward(bases[family], tmp_path / "rm", seed=3)
    tok = load_tokenizer(str(folder))  # from config.json's _name_or_path, as DeepSpeed-Chat did
    assert tok.eos_token_id == load_tokenizer(bases[family]).eos_token_id
    model = RewardModel.from_pretrained(str(folder), tokenizer=tok).eval()
    assert RewardModel.is_reward_model(str(folder))

    for eos in (True, False):  # answers that ended, and answers cut off
        ids, mask = _batch(tok, TEXTS, eos, tok.pad_token_id)
        ds_ids, _ = _batch(tok, TEXTS, eos, tok.eos_token_id)  # DeepSpeed-Chat padded with EOS
        ours = model.score(ids, mask).detach()
        values = H.dschat_values(folder, ds_ids, mask)
        theirs = H.dschat_end_scores(values, ds_ids, prompt_length=2, pad_id=tok.eos_token_id)
        assert torch.allclose(ours, theirs, atol=TOL, rtol=0), (ours, theirs)
        # The critic's per-token values are DeepSpeed-Chat's, except at EOS (read one token earlier).
        mine = model(ids, mask).detach()
        keep = mask.bool() & (ids != tok.eos_token_id)
        assert torch.allclose(mine[keep], values[keep], atol=TOL, rtol=0)

    # Saved again by chatrl (as PPO saves its critic), it keeps DeepSpeed-Chat's convention.
    model.save_pretrained(tmp_path / "again")
    tok.save_pretrained(tmp_path / "again")
    again = RewardModel.from_pretrained(str(tmp_path / "again"), tokenizer=tok).eval()
    ids, mask = _batch(tok, TEXTS, True, tok.pad_token_id)
    assert torch.equal(again.score(ids, mask), model.score(ids, mask))


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_dschat_actor_folder_loads_as_a_causal_lm(tmp_path, bases, family):
    """Step-1 and step-3 actor folders (pytorch_model.bin with Hugging Face names, vocabulary
    rounded up to a multiple of 8, no tokenizer config) load with the base model's tokenizer and
    give the base model's logits."""
    from chatrl.models import load_causal_lm, load_tokenizer

    folder = H.make_dschat_actor(bases[family], tmp_path / "actor")
    tok = load_tokenizer(str(folder))
    model = load_causal_lm(str(folder), tokenizer=tok).eval()
    base = load_causal_lm(bases[family], tokenizer=load_tokenizer(bases[family])).eval()
    ids, mask = _batch(tok, TEXTS, True, tok.pad_token_id)
    with torch.no_grad():
        got, want = model(input_ids=ids, attention_mask=mask).logits, base(input_ids=ids, attention_mask=mask).logits
    assert model.get_input_embeddings().num_embeddings % 8 == 0
    assert torch.allclose(got[..., :want.shape[-1]], want, atol=TOL, rtol=0)


# ----------------------------------------------------------------------------- checkpoints out

@pytest.fixture(scope="module")
def chatrl_rm(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rm")
    chatrl("rm", *TINY, "--per_device_train_batch_size", "8", "--max_steps", "2", "--output_dir", out)
    return out / "model"


def test_export_reward_model_in_dschat_layout(tmp_path, chatrl_rm):
    from chatrl.models import load_tokenizer
    from chatrl.models.reward import RewardModel

    out = tmp_path / "dschat-rm"
    proc = chatrl("export", "--format", "dschat", "--path", chatrl_rm.parent, "--output-dir", out)
    assert "reward model" in proc.stdout
    state = torch.load(out / "pytorch_model.bin", weights_only=True)
    assert "v_head.weight" in state and all(k.startswith("rwtransformer.") for k in state if k != "v_head.weight")
    config = json.loads((out / "config.json").read_text())
    assert "_name_or_path" not in config  # DeepSpeed-Chat then reads the tokenizer from the folder
    emb = next(v for k, v in state.items() if k.endswith("embed_tokens.weight"))
    assert emb.shape[0] % 8 == 0 and emb.shape[0] == config["vocab_size"]
    backbone = safetensors_dir(chatrl_rm)
    for k, v in backbone.items():  # the same tensors, renamed (embeddings: padded rows added)
        assert torch.equal(state["rwtransformer." + k][:v.shape[0]], v), k

    tok = load_tokenizer(str(chatrl_rm))
    original = RewardModel.from_pretrained(str(chatrl_rm), tokenizer=tok).eval()
    ids, mask = _batch(tok, TEXTS, True, tok.pad_token_id)
    # What DeepSpeed-Chat computes from the exported folder: the same per-token values...
    ds_ids, _ = _batch(tok, TEXTS, True, tok.eos_token_id)
    assert torch.allclose(H.dschat_values(out, ds_ids, mask)[mask.bool()],
                          original(ids, mask).detach()[mask.bool()], atol=TOL, rtol=0)
    # ...and chatrl loads it back to the same scores (chatrl.json says it scores the EOS).
    back = RewardModel.from_pretrained(str(out), tokenizer=load_tokenizer(str(out))).eval()
    assert back.score_before_token is None
    assert torch.equal(back.score(ids, mask), original.score(ids, mask))


def test_export_causal_lm_in_dschat_layout(tmp_path):
    from transformers import AutoModelForCausalLM

    sft = tmp_path / "sft"
    chatrl("sft", *TINY, "--per_device_train_batch_size", "8", "--max_steps", "1", "--output_dir", sft)
    out = tmp_path / "dschat-actor"
    chatrl("export", "--format", "dschat", "--path", sft / "model", "--output-dir", out)
    assert set(p.name for p in out.iterdir()) >= {"pytorch_model.bin", "config.json", "tokenizer_config.json"}
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    original = AutoModelForCausalLM.from_pretrained(sft / "model").eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        a, b = exported(input_ids=ids).logits, original(input_ids=ids).logits
    assert torch.allclose(a[..., :b.shape[-1]], b, atol=TOL, rtol=0)


def test_export_errors_are_one_line(tmp_path):
    proc = chatrl("export", "--format", "dschat", "--path", tmp_path / "nope", "--output-dir", tmp_path / "x",
                  check=False)
    assert proc.returncode == 2 and "chatrl: error: model folder" in proc.stderr
