"""Prompt data for online RL: extra columns kept, chat and text prompts, JSONL / Parquet /
save_to_disk, the gsm8k and competition-math adapters, the arithmetic demo task and its
held-out split, bad rows."""

import json

import pytest

from chatrl.data.arith import arith_problems, arith_rows
from chatrl.data.prompts import load_prompt_data, load_prompt_rows, tokenize_prompts
from chatrl.errors import DataError
from chatrl.rewards.verifiers import builtin_reward
from chatrl.rewards import ScoringBatch


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_text_and_chat_prompts_keep_other_columns(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "2+2?", "answer": "4", "topic": "sum"},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3+3?"}],
         "answer": "6", "topic": "sum"},
        {"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}],
         "answer": "2", "topic": "sum"},
    ] * 4)
    pd = load_prompt_rows(str(f), seed=0)
    rows = pd.train + pd.eval
    assert len(rows) == 12 and len(pd.eval) == 1  # seeded 9:1 split (at least one eval row)
    text = next(r for r in rows if not r["conversational"])
    assert text["prompt"] == "2+2?" and text["columns"] == {"answer": "4", "topic": "sum"}
    assert text["messages"] == [{"role": "user", "content": "2+2?"}]
    chat = [r for r in rows if r["conversational"]]
    sys_row = next(r for r in chat if r["messages"][0]["role"] == "system")
    assert sys_row["columns"]["answer"] == "6" and sys_row["prompt"] == sys_row["messages"]
    msg_row = next(r for r in chat if r["messages"][-1]["content"] == "1+1?")
    # `messages`: the turns up to the last user turn are the prompt
    assert msg_row["messages"] == [{"role": "user", "content": "1+1?"}]


def test_parquet_and_save_to_disk_with_test_split(tmp_path):
    import datasets

    rows = [{"question": f"q{i}", "answer": str(i)} for i in range(10)]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:8]),
                               "test": datasets.Dataset.from_list(rows[8:])})
    dd.save_to_disk(str(tmp_path / "saved"))
    pd = load_prompt_rows(str(tmp_path / "saved"))
    assert [r["prompt"] for r in pd.eval] == ["q8", "q9"] and len(pd.train) == 8
    assert pd.train[3]["columns"] == {"answer": "3"}
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "p.parquet"))
    pq = load_prompt_rows(str(tmp_path / "p.parquet"), seed=1)
    assert len(pq.train) == 9 and len(pq.eval) == 1


def test_gsm8k_and_competition_math_adapters_from_local_files(tmp_path):
    g = write_jsonl(tmp_path / "gsm.jsonl", [
        {"question": "Tom has 3 apples and buys 1,000 more. How many?",
         "answer": "3 + 1000 = 1003\n#### 1,003"}] * 3)
    pd = load_prompt_rows(f"openai/gsm8k:{g}", seed=0)
    row = (pd.train + pd.eval)[0]
    assert row["columns"]["answer"] == "1003" and row["columns"]["solution"].endswith("#### 1,003")
    assert row["prompt"].startswith("Tom has 3")
    m = write_jsonl(tmp_path / "math.jsonl", [
        {"problem": "What is $1/2 + 1/4$?", "solution": "It is $\\boxed{\\frac{3}{4}}$.",
         "level": "Level 1", "type": "Algebra"}] * 2)
    row = load_prompt_rows(f"hendrycks/competition_math:{m}", seed=0).train[0]
    assert row["columns"]["answer"] == "\\frac{3}{4}" and row["columns"]["level"] == "Level 1"
    # and the math verifier accepts an equivalent answer
    b = ScoringBatch(prompts=["p"], completions=["0.75"], texts=["so it is 0.75"],
                     columns={"answer": [row["columns"]["answer"]]})
    assert builtin_reward("math")(b) == [1.0]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "no hashes"}])
    with pytest.raises(DataError, match=r"bad.jsonl row 1: field 'answer' should be the worked "
                                        r"solution ending in '#### N'"):
        load_prompt_rows(f"openai/gsm8k:{bad}")


def test_bad_prompt_rows_error_or_skip(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok", "answer": "1"}, {"answer": "2"},
                                           {"prompt": "", "answer": "3"}, {"prompt": "fine"}])
    with pytest.raises(DataError, match=r"p.jsonl row 2: has no prompt.*--skip-bad-rows"):
        load_prompt_rows(str(f))
    pd = load_prompt_rows(str(f), skip_bad_rows=True)
    assert pd.stats["skipped_rows"] == 2 and len(pd.train + pd.eval) == 2
    with pytest.raises(DataError, match="does not exist"):
        load_prompt_rows(str(tmp_path / "nope.jsonl"))


def test_arith_task_is_deterministic_verifiable_and_held_out():
    a, b = arith_problems("train", 300), arith_problems("train", 300)
    assert a == b
    test = arith_problems("test", 100)
    assert not {p["question"] for p in a} & {p["question"] for p in test}
    # every worked solution reaches the answer, and the verifier accepts it
    rows = arith_rows("test", 100)
    texts = [r["columns"]["solution"] for r in rows]
    b = ScoringBatch(prompts=[r["prompt"] for r in rows], completions=texts, texts=texts,
                     columns={"answer": [r["columns"]["answer"] for r in rows]})
    assert builtin_reward("numeric")(b) == [1.0] * 100
    assert all(0 <= p["answer"] < 500 for p in a + test)
    pd = load_prompt_data(["arith"])
    assert len(pd.train) == 1000 and len(pd.eval) == 200 and pd.stats["arith"]["eval_from"] == "test split"


def test_tokenize_prompts_drops_and_counts_long_prompts(tiny_tokenizer):
    rows = [{"messages": [{"role": "user", "content": "hi"}]},
            {"messages": [{"role": "user", "content": "word " * 200}]}]
    out, dropped = tokenize_prompts(rows, tiny_tokenizer, "chat", max_prompt_len=64)
    assert dropped == 1 and len(out) == 1 and 0 < len(out[0]["prompt_input_ids"]) <= 64
    assert out[0]["messages"] == rows[0]["messages"]
