"""Models: tokenizer pad fix, the reward model's scored token under every padding layout,
save/load round trips, LoRA merging, and the tiny architectures."""

from __future__ import annotations

import json

import pytest
import torch

from chatrl.errors import ModelError
from chatrl.models import configure_tokenizer, load_causal_lm, load_tokenizer, resolve_model_path
from chatrl.models.lora import apply_lora, has_lora, lora_merged, lora_targets, merged_state_dict
from chatrl.models.reward import VALUE_HEAD_FILE, RewardModel, gather_last, last_token_index
from chatrl.models.tiny import TINY_ARCHS

ARCHS = list(TINY_ARCHS)


@pytest.fixture(scope="module")
def tiny_paths():
    return {a: resolve_model_path(f"tiny-{a}") for a in ARCHS}


def seqs_for(tok, n=3):
    texts = ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nlovely<|im_end|>",
             "<|im_start|>user\nWhat do you think about rain?<|im_end|>\n<|im_start|>assistant\n"
             "Rain is lovely and calm.<|im_end|>",
             "<|im_start|>user\nDescribe a mountain.<|im_end|>\n<|im_start|>assistant\nTall.<|im_end|>"]
    out = [tok(t, add_special_tokens=False)["input_ids"] for t in texts[:n]]
    assert len({len(s) for s in out}) == n  # different lengths, so padding matters
    return out


def randomize(model, seed=0, scale=0.5):
    """Larger random weights than the tiny init (so padding mistakes show in the outputs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale / max(1, p.shape[-1]) ** 0.5)
    return model


# ----------------------------------------------------------------------------- tokenizers

def test_tiny_tokenizer_gets_a_pad_distinct_from_eos(tiny_model_path):
    tok = load_tokenizer(tiny_model_path)
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert tok.pad_token == "<|endoftext|>"  # an existing spare token: no new row needed
    assert len(tok) == 476 and tok.padding_side == "right"
    assert load_tokenizer(tiny_model_path, padding_side="left").padding_side == "left"


def _eos_only_model(tmp_path):
    """A folder whose tokenizer's only special token is its EOS (GPT-2-like), and a model."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(["hello world, the ocean is lovely"] * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>")
    assert tok.pad_token is None and tok.unk_token is None
    config = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, vocab_size=len(tok),
                                  tie_word_embeddings=True, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return str(tmp_path), len(tok)


def test_eos_only_tokenizer_gets_a_new_pad_and_the_model_grows(tmp_path):
    path, vocab = _eos_only_model(tmp_path)
    tok = load_tokenizer(path)
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id == vocab  # a new token, the next id
    assert tok.pad_token_id != tok.eos_token_id and len(tok) == vocab + 1
    model = load_causal_lm(path, tokenizer=tok)
    assert model.get_input_embeddings().num_embeddings == vocab + 1
    assert model.get_output_embeddings().weight.shape[0] == vocab + 1
    assert model.generation_config.pad_token_id == tok.pad_token_id
    ids = torch.tensor([[tok.eos_token_id, tok.pad_token_id]])
    assert model(input_ids=ids).logits.shape == (1, 2, vocab + 1)  # the pad id is a valid row
    rm = RewardModel.from_pretrained(path, tokenizer=tok)
    assert rm.get_input_embeddings().num_embeddings == vocab + 1
    # configure_tokenizer is idempotent
    assert configure_tokenizer(tok).pad_token_id == vocab and len(tok) == vocab + 1


def test_tokenizer_without_eos_is_refused(tiny_model_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    tok.eos_token = None
    with pytest.raises(ModelError, match="no EOS"):
        configure_tokenizer(tok)


# ----------------------------------------------------------------------------- reward model

def test_last_token_index_and_gather():
    mask = torch.tensor([[1, 1, 1, 0, 0],    # right padding
                         [0, 0, 1, 1, 1],    # left padding
                         [0, 1, 1, 0, 0],    # left-padded prompt + right-padded answer
                         [0, 0, 0, 0, 0]])   # empty row: index 0, not -1
    assert last_token_index(mask).tolist() == [2, 4, 2, 0]
    values = torch.arange(20, dtype=torch.float).view(4, 5)
    assert gather_last(values, mask).tolist() == [2.0, 9.0, 12.0, 15.0]


@torch.no_grad()
@pytest.mark.parametrize("arch", ARCHS)
def test_reward_scores_do_not_depend_on_padding(arch, tiny_paths):
    path = tiny_paths[arch]
    tok = load_tokenizer(path)
    torch.manual_seed(0)
    model = randomize(RewardModel.from_pretrained(path, tokenizer=tok)).eval()
    seqs = seqs_for(tok)
    single = torch.stack([model.score(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0]
                          for s in seqs])
    assert single.abs().min() > 1e-3 and len(set(single.tolist())) == 3
    pad = tok.pad_token_id
    width = max(len(s) for s in seqs) + 3

    # right padding
    ids = torch.full((3, width), pad)
    mask = torch.zeros((3, width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    assert torch.allclose(model.score(ids, mask), single, atol=1e-5, rtol=1e-5)

    # PPO layout: left-padded prompt, then the answer, right-padded
    ids = torch.full((3, width + 4), pad)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        cut = len(s) // 2                  # prompt = s[:cut], answer = s[cut:]
        start = 4 + (width // 2) - cut     # prompts end at the same column
        ids[i, start:start + len(s)] = torch.tensor(s)
        mask[i, start:start + len(s)] = 1
    assert (mask[:, 0] == 0).all() and (mask[:, -1] == 0).all()  # padded on both sides
    assert torch.allclose(model.score(ids, mask), single, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_reward_model_save_load_round_trip(tiny_model_path, tmp_path):
    tok = load_tokenizer(tiny_model_path)
    model = randomize(RewardModel.from_pretrained(tiny_model_path, tokenizer=tok), seed=3).eval()
    model.save_pretrained(tmp_path, step="rm", template="chat")
    assert (tmp_path / VALUE_HEAD_FILE).exists() and RewardModel.is_reward_model(str(tmp_path))
    meta = json.loads((tmp_path / "chatrl.json").read_text())
    assert meta == {"kind": "reward_model", "step": "rm", "template": "chat"}
    back = RewardModel.from_pretrained(str(tmp_path)).eval()
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    s = seqs_for(tok)[1]
    ids, mask = torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)
    assert torch.equal(model.score(ids, mask), back.score(ids, mask))
    # the backbone folder is a plain Transformers model
    from transformers import AutoModel

    plain, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # a reward-model folder that lost its head is refused, not silently re-initialised
    (tmp_path / VALUE_HEAD_FILE).unlink()
    with pytest.raises(ModelError, match=VALUE_HEAD_FILE):
        RewardModel.from_pretrained(str(tmp_path))


# ----------------------------------------------------------------------------- LoRA

@torch.no_grad()
@pytest.mark.parametrize("arch", ARCHS)
def test_lora_merged_state_dict_equals_merge_in_place(arch, tiny_paths):
    path = tiny_paths[arch]
    tok = load_tokenizer(path)
    base = load_causal_lm(path, tokenizer=tok)
    n_targets = len(lora_targets(base))
    model = apply_lora(randomize(load_causal_lm(path, tokenizer=tok), seed=1), rank=4, alpha=8)
    assert has_lora(model)
    g = torch.Generator().manual_seed(2)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: make the adapters do something
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    assert sum("lora_A" in n for n, _ in model.named_parameters()) == n_targets > 0
    model.eval()
    s = seqs_for(tok)[1]
    ids = torch.tensor([s])
    with_adapters = model(input_ids=ids).logits

    merged = merged_state_dict(model)
    assert not [k for k in merged if "lora_" in k or "base_layer" in k]
    fresh = load_causal_lm(path, tokenizer=tok).eval()
    missing, unexpected = fresh.load_state_dict(merged, strict=False)
    assert not unexpected and not [k for k in missing if k != "lm_head.weight"]  # tied head
    from_merged = fresh(input_ids=ids).logits

    with lora_merged(model):
        in_place = model(input_ids=ids).logits
    after = model(input_ids=ids).logits  # unmerged again

    assert (with_adapters - randomize(base, seed=1).eval()(input_ids=ids).logits).abs().max() > 1e-3
    for name, x in (("merged_state_dict", from_merged), ("merge in place", in_place),
                    ("after unmerge", after)):
        assert torch.allclose(x, with_adapters, atol=1e-5, rtol=1e-4), (name, (x - with_adapters).abs().max())


@pytest.mark.parametrize("only_optimize", [False, True])
def test_lora_trainable_parameters(tiny_model_path, only_optimize):
    """DeepSpeed-Chat's meaning of --lora-dim: LoRA alone adds adapters and everything still trains
    (base weights, embeddings, norms, the value head); --only-optimize-lora trains the adapters and
    a reward model's (new) value head only. PEFT's injection freezes every non-adapter weight, which
    left `chatrl rm --lora-dim N` training adapters under a random, frozen value head."""
    rm = apply_lora(RewardModel.from_pretrained(tiny_model_path), rank=4, only_optimize=only_optimize)
    lm = apply_lora(load_causal_lm(tiny_model_path), rank=4, only_optimize=only_optimize)
    for model, head in ((rm, {"v_head.weight"}), (lm, set())):
        names = {n for n, _ in model.named_parameters()}
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        adapters = {n for n in names if "lora_" in n}
        assert adapters and head <= names
        expected = adapters | head if only_optimize else names
        assert trainable == expected, (type(model).__name__, sorted(trainable ^ expected)[:6])


def test_only_optimize_lora_freezes_the_base_but_not_the_value_head(tiny_model_path):
    rm = apply_lora(RewardModel.from_pretrained(tiny_model_path), rank=2, only_optimize=True)
    trainable = {n for n, p in rm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("v_head") for n in trainable)
    assert "v_head.weight" in trainable
    with pytest.raises(Exception, match="matches no linear layer"):
        apply_lora(load_causal_lm(tiny_model_path), rank=2, module_filter="no.such.module")


# ----------------------------------------------------------------------------- tiny models

@torch.no_grad()
@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_archs_load(arch, tiny_paths):
    from transformers import AutoModelForCausalLM

    path = tiny_paths[arch]
    expected = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel", "opt": "OPTForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "bloom": "BloomForCausalLM"}[arch]
    tok = load_tokenizer(path)
    assert tok.pad_token_id != tok.eos_token_id and tok.chat_template
    model = load_causal_lm(path, tokenizer=tok).eval()
    assert type(model).__name__ == expected
    assert model.config.num_hidden_layers == 2 and model.get_input_embeddings().embedding_dim == 64
    assert model.get_input_embeddings().num_embeddings == len(tok)
    assert 50_000 < sum(p.numel() for p in model.parameters()) < 500_000
    ids = torch.tensor([seqs_for(tok)[0]])
    logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()
    # the same files load with plain Transformers to the same outputs
    assert torch.equal(AutoModelForCausalLM.from_pretrained(path).eval()(input_ids=ids).logits, logits)
    # deterministic: building again gives the same weights
    assert resolve_model_path(f"tiny-{arch}") == path


def test_unknown_tiny_arch():
    with pytest.raises(ModelError, match="tiny-llama"):
        resolve_model_path("tiny-mamba")


def test_ema_folder_on_a_full_disk_is_a_one_line_error(tiny_model_path, tmp_path, monkeypatch):
    """Step 3's actor_ema/ is written like the other final models: the EMA weights (not the
    module's) land in a loadable folder, and a full disk is an OutputError naming the folder, not
    a traceback (it used to escape as a bare OSError)."""
    import errno
    from types import SimpleNamespace

    from chatrl.errors import OutputError
    from chatrl.steps.ppo import save_ema

    model, tok = load_causal_lm(tiny_model_path), load_tokenizer(tiny_model_path)
    ema = {k: torch.full_like(v, 0.5, dtype=torch.float32) for k, v in model.state_dict().items()}
    models = SimpleNamespace(actor=SimpleNamespace(module=model), actor_ema=ema)
    save_ema(models, tok, tmp_path / "actor_ema", {"step": "ppo-ema"})
    back = load_causal_lm(str(tmp_path / "actor_ema"))
    assert all(torch.all(p == 0.5) for p in back.parameters())

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(model), "save_pretrained", full)
    with pytest.raises(OutputError, match=r"no space left on device while writing .*actor_ema2"):
        save_ema(models, tok, tmp_path / "actor_ema2", {"step": "ppo-ema"})
    assert not (tmp_path / "actor_ema2").exists()
