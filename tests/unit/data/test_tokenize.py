"""Tokenizing unified rows per step: exact tokens, EOS, truncation, dropped prompts, the cache."""

import pytest

from chatrl.data import collate_sft, tokenize_step_data
from chatrl.data import tokenize as tokmod
from chatrl.data.sources import rows_to_dataset
from chatrl.errors import ConfigError


def user(text):
    return [{"role": "user", "content": text}]


@pytest.fixture
def rows():
    return rows_to_dataset([
        {"messages": user("Hi"), "chosen": "Yo", "rejected": "No"},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                      {"role": "user", "content": "Bye"}], "chosen": "Ciao", "rejected": None},
    ])


CHAT_PROMPT = ["<|im_start|>", "user", "Ċ", "H", "i", "<|im_end|>", "Ċ", "<|im_start|>", "a",
               "ssistant", "Ċ"]
PLAIN_PROMPT = ["Ċ", "Ċ", "Human", ":", "Ġ", "H", "i", "Ċ", "Ċ", "A", "ssistant", ":"]


def tokens(tok, ids):
    return tok.convert_ids_to_tokens(list(ids))


def test_sft_chat_template_tokens_by_hand(rows, tiny_tokenizer, tmp_path):
    ds, stats = tokenize_step_data(rows, tiny_tokenizer, step="sft", template="chat",
                                   cache_root=tmp_path)
    row = ds[0]
    # <|im_start|> and <|im_end|> are single special tokens; the response "Yo" follows the
    # prompt, then the EOS id (<|im_end|>) is appended.
    assert tokens(tiny_tokenizer, row["input_ids"]) == CHAT_PROMPT + ["Y", "o", "<|im_end|>"]
    assert row["input_ids"][-1] == tiny_tokenizer.eos_token_id == 2
    assert row["prompt_len"] == len(CHAT_PROMPT) == 11
    batch = collate_sft([row], tiny_tokenizer.pad_token_id)
    assert batch["labels"][0].tolist() == [-100] * 11 + row["input_ids"][11:]
    assert stats["rows_in"] == stats["rows_out"] == 2 and stats["cache"] == "miss"
    # Multi-turn prompt: the earlier assistant turn is part of the prompt.
    text = tiny_tokenizer.decode(ds[1]["input_ids"])
    assert text == ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n"
                    "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\nCiao<|im_end|>")


def test_sft_plain_template_tokens_by_hand(rows, tiny_tokenizer, tmp_path):
    ds, _ = tokenize_step_data(rows, tiny_tokenizer, step=1, template="plain", cache_root=tmp_path)
    assert tokens(tiny_tokenizer, ds[0]["input_ids"]) == PLAIN_PROMPT + ["Ġ", "Y", "o", "<|im_end|>"]
    assert ds[0]["prompt_len"] == 12
    assert tiny_tokenizer.decode(ds[1]["input_ids"]) == (
        "\n\nHuman: Hi\n\nAssistant: Yo\n\nHuman: Bye\n\nAssistant: Ciao<|im_end|>")


def test_rm_pairs_and_rows_without_rejected(rows, tiny_tokenizer, tmp_path):
    ds, stats = tokenize_step_data(rows, tiny_tokenizer, step="rm", template="chat", cache_root=tmp_path)
    assert len(ds) == 1 and stats["dropped_no_rejected"] == 1
    assert tokens(tiny_tokenizer, ds[0]["chosen_input_ids"]) == CHAT_PROMPT + ["Y", "o", "<|im_end|>"]
    assert tokens(tiny_tokenizer, ds[0]["rejected_input_ids"]) == CHAT_PROMPT + ["N", "o", "<|im_end|>"]
    assert ds[0]["prompt_len"] == 11


def test_truncation_and_prompts_that_fill_max_seq_len(tiny_tokenizer, tmp_path):
    ds = rows_to_dataset([{"messages": user("Hi"), "chosen": "A much longer answer here", "rejected": "x"},
                          {"messages": user("Hi " * 20), "chosen": "y", "rejected": "z"}])
    out, stats = tokenize_step_data(ds, tiny_tokenizer, step="sft", template="chat", max_seq_len=14,
                                    cache_root=tmp_path)
    assert len(out) == 1 and stats["dropped_long_prompts"] == 1 and stats["truncated"] == 1
    assert len(out[0]["input_ids"]) == 14 and out[0]["input_ids"][:11] == \
        tiny_tokenizer.convert_tokens_to_ids(CHAT_PROMPT)
    rm, rm_stats = tokenize_step_data(ds, tiny_tokenizer, step="rm", template="chat", max_seq_len=14,
                                      cache_root=tmp_path)
    assert len(rm) == 1 and rm_stats["dropped_long_prompts"] == 1 and rm_stats["truncated"] == 1
    assert len(rm[0]["chosen_input_ids"]) == 14 and len(rm[0]["rejected_input_ids"]) == 13


def test_prompt_step_drops_long_prompts(rows, tiny_tokenizer, tmp_path):
    out, stats = tokenize_step_data(rows, tiny_tokenizer, step="prompt", template="chat",
                                    max_prompt_len=11, cache_root=tmp_path)
    assert len(out) == 1 and stats["dropped_long_prompts"] == 1
    assert tokens(tiny_tokenizer, out[0]["prompt_input_ids"]) == CHAT_PROMPT
    assert out[0]["messages"] == user("Hi")
    out, stats = tokenize_step_data(rows, tiny_tokenizer, step=3, template="chat", max_prompt_len=10,
                                    cache_root=tmp_path)
    assert len(out) == 0 and stats["dropped_long_prompts"] == 2 and out.column_names == [
        "prompt_input_ids", "messages"]


def test_cache_hit_does_not_retokenize_and_changes_miss(rows, tiny_tokenizer, tmp_path, monkeypatch):
    kw = dict(step="sft", template="chat", max_seq_len=64, cache_root=tmp_path)
    first, s1 = tokenize_step_data(rows, tiny_tokenizer, **kw)
    assert s1["cache"] == "miss"

    def boom(*a, **k):
        raise AssertionError("re-tokenized on a cache hit")

    monkeypatch.setattr(tokmod, "_tokenize_rows", boom)
    second, s2 = tokenize_step_data(rows, tiny_tokenizer, **kw)
    assert s2["cache"] == "hit" and s2["cache_path"] == s1["cache_path"]
    assert list(second) == list(first) and s2["rows_out"] == s1["rows_out"]
    # The same rows built again (same content -> same fingerprint) hit too.
    same = rows_to_dataset([dict(r) for r in rows])
    assert tokenize_step_data(same, tiny_tokenizer, **kw)[1]["cache"] == "hit"
    monkeypatch.undo()

    changes = [dict(kw, max_seq_len=63), dict(kw, max_prompt_len=100), dict(kw, template="plain"),
               dict(kw, step="rm"), dict(kw, cache_key_parts={"sources": ["a.jsonl"]})]
    paths = {s1["cache_path"]}
    for change in changes:
        _, s = tokenize_step_data(rows, tiny_tokenizer, **change)
        assert s["cache"] == "miss", change
        paths.add(s["cache_path"])
    other_rows = rows_to_dataset([{"messages": user("Hi"), "chosen": "Yo!", "rejected": None}])
    _, s = tokenize_step_data(other_rows, tiny_tokenizer, **kw)
    assert s["cache"] == "miss"
    # A different tokenizer (here: another chat template) misses as well.
    tok2 = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    tok2.pad_token = tiny_tokenizer.pad_token
    tok2.chat_template = tiny_tokenizer.chat_template.replace("'\n'", "'\n\n'")
    assert tok2.chat_template != tiny_tokenizer.chat_template
    _, s = tokenize_step_data(rows, tok2, **kw)
    assert s["cache"] == "miss"
    assert len(paths) == len(changes) + 1
    # Nothing half-written and no padding stored: row lengths differ.
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
    assert len({len(r["input_ids"]) for r in first}) == 2


def test_empty_result_is_cached(tiny_tokenizer, tmp_path):
    ds = rows_to_dataset([{"messages": user("Hi " * 30), "chosen": "y", "rejected": None}])
    kw = dict(step="prompt", template="chat", max_prompt_len=5, cache_root=tmp_path)
    out, s = tokenize_step_data(ds, tiny_tokenizer, **kw)
    assert len(out) == 0 and s["cache"] == "miss"
    out, s = tokenize_step_data(ds, tiny_tokenizer, **kw)
    assert len(out) == 0 and s["cache"] == "hit"


def test_bad_options(rows, tiny_tokenizer, tmp_path):
    with pytest.raises(ConfigError, match="no tokenized form"):
        tokenize_step_data(rows, tiny_tokenizer, step="ppo", template="chat", cache_root=tmp_path)
    with pytest.raises(ConfigError, match="--template 'fancy' is not known"):
        tokenize_step_data(rows, tiny_tokenizer, step="sft", template="fancy", cache_root=tmp_path)
    with pytest.raises(ConfigError, match="too small"):
        tokenize_step_data(rows, tiny_tokenizer, step="sft", template="chat", max_seq_len=1,
                           cache_root=tmp_path)
