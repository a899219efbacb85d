"""What the DeepSpeed-Chat compatibility tests share: the derived script argument lists, local
stand-ins for the hub datasets they name, and model folders in DeepSpeed-Chat's own layout.

Stand-in data: one JSONL file per hub dataset, written in that dataset's schema (DATASETS.md)
and passed as "<hub name>:<file>", so each dataset's adapter reads it as it would the download.

DeepSpeed-Chat layout (what its save_hf_format wrote): `torch.save(module.state_dict())` as
pytorch_model.bin, the module's config.json with `_name_or_path` naming the base model (as the
Transformers versions of its time wrote it), and the tokenizer's vocabulary files only. Its
models' embeddings were resized to a multiple of 8 of the tokenizer's length, and its reward
model saved the backbone under `rwtransformer.` and the value head as `v_head.weight`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

SCRIPTS_FILE = Path(__file__).parent / "data" / "dschat_scripts.json"
FAMILY_MODEL = {"opt": "tiny-opt", "llama": "tiny-llama", "bloom": "tiny-bloom", "gpt2": "tiny-gpt2"}
# DeepSpeed-Chat's default --data_path (every step's main.py), used by scripts that give none.
DSCHAT_DEFAULT_DATA = "Dahoas/rm-static"


def load_scripts() -> list[dict]:
    return json.loads(SCRIPTS_FILE.read_text())["scripts"]


def script_id(entry: dict) -> str:
    """'step1/llama2/run_llama2_7b.sh' for a script entry."""
    step, _, rest = entry["script"].partition("/training_scripts/")
    return f"{step.split('_')[0]}{'-dpo' if 'dpo' in step else ''}/{rest}"


# ----------------------------------------------------------------------------- stand-in data

_TOPICS = ["the ocean", "mountains", "rain", "gardens", "music", "cooking", "trains", "libraries",
           "bicycles", "the moon", "coffee", "painting", "forests", "chess", "rivers", "winter"]
_ZH = ["海洋", "山", "雨", "花园", "音乐", "烹饪", "火车", "图书馆"]
_JA = ["海", "山", "雨", "庭", "音楽", "料理", "電車", "図書館"]


def _english(i: int) -> tuple[str, str, str]:
    t = _TOPICS[i % len(_TOPICS)]
    return (f"What do you think about {t} (question {i})?",
            f"I think {t} is wonderful, bright and lovely.",
            f"{t.capitalize()}? Dull.")


def _rows(name: str, i: int) -> dict:
    q, good, bad = _english(i)
    zh, ja = _ZH[i % len(_ZH)], _JA[i % len(_JA)]
    if name in ("Dahoas/rm-static", "Dahoas/full-hh-rlhf"):
        return {"prompt": f"\n\nHuman: {q}\n\nAssistant:", "response": f" {good}",
                "chosen": f" {good}", "rejected": f" {bad}"}
    if name == "Dahoas/synthetic-instruct-gptj-pairwise":
        return {"prompt": q, "chosen": good, "rejected": bad}
    if name == "yitingxie/rlhf-reward-datasets":
        return {"prompt": f"\n\nHuman: {q}\n\n", "chosen": f"\n\nHuman: {q}\n\nAssistant: {good}",
                "rejected": f"\n\nHuman: {q}\n\nAssistant: {bad}"}
    if name == "wangrui6/Zhihu-KOL":
        return {"INSTRUCTION": f"请谈谈{zh}（{i}）。", "RESPONSE": f"{zh}很美好，令人愉快。"}
    if name == "Cohere/miracl-zh-queries-22-12":
        return {"query": f"{zh}是什么？（{i}）", "positive_passages": [{"text": f"{zh}是美好的。"}],
                "negative_passages": [{"text": "不知道。"}]}
    if name == "Hello-SimpleAI/HC3-Chinese":
        return {"question": f"为什么喜欢{zh}？（{i}）", "human_answers": [f"因为{zh}让人开心。"]}
    if name == "mkqa-Chinese":
        return {"queries": {"zh_cn": f"{zh}在哪里？（{i}）"}, "answers": {"zh_cn": [{"text": f"{zh}在这里。"}]}}
    if name == "mkqa-Japanese":
        return {"queries": {"ja": f"{ja}はどこ？（{i}）"}, "answers": {"ja": [{"text": f"{ja}はここです。"}]}}
    if name == "Cohere/miracl-ja-queries-22-12":
        return {"query": f"{ja}とは？（{i}）", "positive_passages": [{"text": f"{ja}は素晴らしい。"}],
                "negative_passages": [{"text": "わかりません。"}]}
    if name == "lmqg/qg_jaquad":
        return {"question": f"{ja}について教えて（{i}）", "sentence": f"{ja}はとても美しい。"}
    if name == "lmqg/qag_jaquad":
        return {"questions": [f"{ja}はどうですか（{i}）"], "paragraph": f"{ja}は楽しいです。"}
    raise KeyError(f"no stand-in schema for {name!r}; add one to tests/e2e/dschat_helpers.py")


def write_standin(folder: Path, name: str, n_rows: int) -> Path:
    """A JSONL file of `n_rows` rows in hub dataset `name`'s schema."""
    f = Path(folder) / (name.replace("/", "__") + ".jsonl")
    if not f.exists():
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("".join(json.dumps(_rows(name, i), ensure_ascii=False) + "\n"
                             for i in range(n_rows)), encoding="utf-8")
    return f


# ----------------------------------------------------------------------------- DeepSpeed-Chat folders

def _dschat_tokenizer(base: str):
    """The tokenizer as DeepSpeed-Chat set it up: the base model's, padding with the EOS."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    tok.pad_token = tok.eos_token
    return tok


def _write_folder(out: Path, state: dict, config, tok, base: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    torch.save(state, out / "pytorch_model.bin")
    cfg = config.to_dict()
    cfg["_name_or_path"] = str(base)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    tok.backend_tokenizer.model.save(str(out))  # what save_vocabulary wrote: vocab.json, merges.txt
    return out


def make_dschat_actor(base: str, out: Path) -> Path:
    """A step-1 (or step-3 actor) folder as DeepSpeed-Chat wrote it, from the model at `base`."""
    from transformers import AutoModelForCausalLM

    tok = _dschat_tokenizer(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.config.end_token_id = tok.eos_token_id
    model.config.pad_token_id = model.config.eos_token_id
    model.resize_token_embeddings(int(8 * math.ceil(len(tok) / 8)), mean_resizing=False)
    return _write_folder(Path(out), model.state_dict(), model.config, tok, base)


def make_dschat_reward(base: str, out: Path, seed: int = 0) -> Path:
    """A step-2 (or step-3 critic) folder as DeepSpeed-Chat wrote it: the backbone of `base`
    under `rwtransformer.` and a random value head."""
    from transformers import AutoModel

    tok = _dschat_tokenizer(base)
    backbone = AutoModel.from_pretrained(base, dtype=torch.float32)
    backbone.config.end_token_id = tok.eos_token_id
    backbone.config.pad_token_id = backbone.config.eos_token_id
    backbone.resize_token_embeddings(int(8 * math.ceil(len(tok) / 8)), mean_resizing=False)
    width = getattr(backbone.config, "word_embed_proj_dim", None) or backbone.config.hidden_size
    if not hasattr(backbone.config, "word_embed_proj_dim"):
        backbone.config.n_embd = width  # DeepSpeed-Chat's RewardModel wrote this into the config
    g = torch.Generator().manual_seed(seed)
    head = torch.randn(1, width, generator=g) / math.sqrt(width)
    state = {f"rwtransformer.{k}": v for k, v in backbone.state_dict().items()}
    state["v_head.weight"] = head
    return _write_folder(Path(out), state, backbone.config, tok, base)


def dschat_values(folder: Path, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-token values [batch, seq] of the reward model in DeepSpeed-Chat folder `folder`, computed
    as DeepSpeed-Chat did: its AutoModel backbone built from config.json with the `rwtransformer.`
    weights loaded, last hidden state times v_head."""
    from transformers import AutoConfig, AutoModel

    state = torch.load(Path(folder) / "pytorch_model.bin", weights_only=True)
    head = state.pop("v_head.weight")
    backbone = AutoModel.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
    backbone.load_state_dict({k[len("rwtransformer."):]: v for k, v in state.items()})
    backbone.eval()
    with torch.no_grad():
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return (hidden @ head.T).squeeze(-1)


def dschat_end_scores(values: torch.Tensor, input_ids: torch.Tensor, prompt_length: int,
                      pad_id: int) -> torch.Tensor:
    """DeepSpeed-Chat's score rule (forward_value's chosen_end_scores, used in its step 3), from
    its documented behaviour: the value at the position before the first pad (= EOS, since it
    padded with EOS) at or after `prompt_length`, or at the last position if there is none."""
    scores = []
    for row, ids in zip(values, input_ids):
        pads = (ids[prompt_length:] == pad_id).nonzero()
        end = int(pads[0]) + prompt_length if len(pads) else ids.shape[0]
        scores.append(row[end - 1])
    return torch.stack(scores)


# ----------------------------------------------------------------------------- argument lists

def script_argv(entry: dict, *, output: Path, model: str, actor: str | None = None,
                critic: str | None = None, data: dict[str, Path], answer_len: int | None = None
                ) -> list[str]:
    """The script's argument list for `chatrl <step>`, with only these substitutions:
    {output}/{actor}/{critic} -> the given paths; --model_name_or_path -> `model` (a tiny model of
    the script's family); each hub dataset of --data_path -> "<name>:<stand-in file>" (scripts
    without --data_path get DeepSpeed-Chat's default, Dahoas/rm-static, explicitly, because
    chatrl's default is its demo task); sizes: steps 1/2/DPO stop after one optimizer step
    (--max_steps 1, epochs unchanged), step 3 runs DeepSpeed-Chat's own test mode for one
    iteration (--enable_test_mode --test_stop_step 1) and, when `answer_len` is given, generates
    at most that many tokens (--max_answer_seq_len); --progress false keeps the log short."""
    subst = {"{output}": str(output), "{actor}": str(actor), "{critic}": str(critic)}
    args = [subst.get(a, a) for a in entry["args"]]
    if "--model_name_or_path" in args:
        args[args.index("--model_name_or_path") + 1] = model
    if "--data_path" in args:
        i = args.index("--data_path") + 1
        while i < len(args) and not args[i].startswith("--"):
            args[i] = f"{args[i]}:{data[args[i]]}"
            i += 1
    else:
        args += ["--data_path", f"{DSCHAT_DEFAULT_DATA}:{data[DSCHAT_DEFAULT_DATA]}"]
    if entry["step"] == "ppo":
        args += ["--enable_test_mode", "--test_stop_step", "1"]
        # DeepSpeed-Chat accumulates an optimizer step over several rollouts when the generation
        # batch is smaller than micro-batch x accumulation (the single-GPU OPT scripts); chatrl
        # refuses that unless the update holds that many rollout batches, and says so
        flags = flag_values(args)
        gen = int(flags.get("per_device_generation_batch_size", 16))
        step = int(flags.get("per_device_training_batch_size", 16)) * int(flags.get("gradient_accumulation_steps", 1))
        if gen % step:
            args += ["--generation_batches", str(step // math.gcd(gen, step))]
        if answer_len is not None:
            args += ["--max_answer_seq_len", str(answer_len)]
    else:
        args += ["--max_steps", "1"]
    return args + ["--progress", "false"]


def flag_values(args: list[str]) -> dict[str, object]:
    """--flag value pairs of an argument list (a flag without a value: True; several values: a list)."""
    out: dict[str, object] = {}
    i = 0
    while i < len(args):
        name = args[i][2:]
        j = i + 1
        while j < len(args) and not args[j].startswith("--"):
            j += 1
        vals = args[i + 1:j]
        out[name] = True if not vals else (vals[0] if len(vals) == 1 else vals)
        i = j
    return out
