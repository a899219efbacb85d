"""Every named adapter of DATASETS.md, on rows written by hand in that dataset's real schema,
loaded from a local JSONL through the "<name>:<path>" form."""

import json

import pytest

from chatrl.data import ADAPTERS, adapt_rows, load_source
from chatrl.data.adapters import RowError, get_field, remove_citations
from chatrl.errors import DataError


def user(text):
    return [{"role": "user", "content": text}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def load_rows(name, tmp_path, rows, **kw):
    """All unified rows (train + eval) of `rows` read as dataset `name`, and the SourceData."""
    f = write_jsonl(tmp_path / "rows.jsonl", rows)
    sd = load_source(f"{name}:{f}", seed=0, **kw)
    return list(sd.train) + list(sd.eval), sd


def same(got, expected):
    key = lambda r: json.dumps(r, sort_keys=True, ensure_ascii=False)  # noqa: E731
    assert sorted(got, key=key) == sorted(expected, key=key)


def test_every_named_dataset_of_the_table_has_an_adapter():
    names = {"Dahoas/rm-static", "Dahoas/full-hh-rlhf", "Dahoas/synthetic-instruct-gptj-pairwise",
             "yitingxie/rlhf-reward-datasets", "openai/webgpt_comparisons", "stanfordnlp/SHP",
             "pvduy/sharegpt_alpaca_oa_vicuna_format", "wangrui6/Zhihu-KOL",
             "Cohere/miracl-zh-queries-22-12", "Hello-SimpleAI/HC3-Chinese", "mkqa-Chinese",
             "mkqa-Japanese", "Cohere/miracl-ja-queries-22-12", "lmqg/qg_jaquad", "lmqg/qag_jaquad"}
    assert set(ADAPTERS) == names
    assert ADAPTERS["mkqa-Chinese"].hub_name == ADAPTERS["mkqa-Japanese"].hub_name == "mkqa"


@pytest.mark.parametrize("name", ["Dahoas/rm-static", "Dahoas/full-hh-rlhf"])
def test_dahoas_multi_turn_prompt(tmp_path, name):
    rows = [
        {"prompt": "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant:",
         "response": " 6.", "chosen": " 6.", "rejected": " 7."},
        {"prompt": "\n\nHuman: Name a color.\n\nAssistant:", "response": " Blue.",
         "chosen": " Blue.", "rejected": " I will not."},
    ]
    got, sd = load_rows(name, tmp_path, rows)
    same(got, [
        {"messages": [{"role": "user", "content": "What is 2+2?"},
                      {"role": "assistant", "content": "4."},
                      {"role": "user", "content": "And 3+3?"}], "chosen": "6.", "rejected": "7."},
        {"messages": user("Name a color."), "chosen": "Blue.", "rejected": "I will not."},
    ])
    assert sd.pairwise and sd.name == f"{name}:{tmp_path / 'rows.jsonl'}"


def test_synthetic_gptj_wraps_the_prompt(tmp_path):
    rows = [{"prompt": "How do I bake bread?", "chosen": "Mix flour, water and yeast, then bake.",
             "rejected": "Buy it."},
            {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."}]
    got, _ = load_rows("Dahoas/synthetic-instruct-gptj-pairwise", tmp_path, rows)
    same(got, [{"messages": user("How do I bake bread?"),
                "chosen": "Mix flour, water and yeast, then bake.", "rejected": "Buy it."},
               {"messages": user("Say hi."), "chosen": "Hi!", "rejected": "No."}])


def test_yitingxie_takes_text_after_last_assistant(tmp_path):
    rows = [
        {"prompt": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit.\n\n",
         "chosen": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit."
                   "\n\nAssistant: An apple.",
         "rejected": "Assistant: A carrot."},
        {"prompt": "\n\nHuman: What is the capital of France?",
         "chosen": " Assistant: Paris.", "rejected": " Assistant: Lyon."},
    ]
    got, _ = load_rows("yitingxie/rlhf-reward-datasets", tmp_path, rows)
    same(got, [
        {"messages": [{"role": "user", "content": "Hi there"},
                      {"role": "assistant", "content": "Hello! How can I help?"},
                      {"role": "user", "content": "Name a fruit."}],
         "chosen": "An apple.", "rejected": "A carrot."},
        {"messages": user("What is the capital of France?"), "chosen": "Paris.", "rejected": "Lyon."},
    ])


def webgpt_row(q, a0, s0, a1, s1):
    quotes = {"title": ["Sky - Wikipedia"], "extract": ["The sky is blue."]}
    return {"question": {"dataset": "eli5", "id": "q" + str(len(q)), "full_text": q},
            "quotes_0": quotes, "answer_0": a0, "tokens_0": [], "score_0": s0,
            "quotes_1": quotes, "answer_1": a1, "tokens_1": [], "score_1": s1}


def test_webgpt_scores_tie_and_citations(tmp_path):
    rows = [
        # A tie goes to answer_0; citations such as [1] and [2, 3] are removed.
        webgpt_row("Why is the sky blue?", "Because of Rayleigh scattering [1]. Blue light scatters "
                   "more [2, 3].", 0.0, "It reflects the ocean.", 0.0),
        webgpt_row("Why do cats purr?", "No idea [1].", -1.0, "Purring signals contentment [1][2].", 1.0),
        webgpt_row("Is water wet?", "Yes, it wets things [4].", 0.5, "No.", -0.5),
    ]
    got, sd = load_rows("openai/webgpt_comparisons", tmp_path, rows)
    same(got, [
        {"messages": user("Why is the sky blue?"),
         "chosen": "Because of Rayleigh scattering. Blue light scatters more.",
         "rejected": "It reflects the ocean."},
        {"messages": user("Why do cats purr?"), "chosen": "Purring signals contentment.",
         "rejected": "No idea."},
        {"messages": user("Is water wet?"), "chosen": "Yes, it wets things.", "rejected": "No."},
    ])
    assert sd.stats["eval_from"].startswith("seeded 9:1")


def test_remove_citations_keeps_other_brackets():
    assert remove_citations("See [1-3] and (this) [a].") == "See and (this) [a]."


def shp_row(history, a, b, label):
    return {"post_id": "p1", "domain": "askscience_train", "upvote_ratio": 0.9, "history": history,
            "c_root_id_A": "a", "c_root_id_B": "b", "created_at_utc_A": 1, "created_at_utc_B": 2,
            "score_A": 10, "score_B": 3, "human_ref_A": a, "human_ref_B": b, "labels": label,
            "seconds_difference": 1.0, "score_ratio": 3.3}


def test_shp_labels(tmp_path):
    rows = [shp_row("Why is ice slippery?", "A thin film of water.", "Magic.", 1),
            shp_row("How far is the moon?", "Very far.", "About 384,000 km.", 0)]
    got, _ = load_rows("stanfordnlp/SHP", tmp_path, rows)
    same(got, [
        {"messages": user("Why is ice slippery?"), "chosen": "A thin film of water.", "rejected": "Magic."},
        {"messages": user("How far is the moon?"), "chosen": "About 384,000 km.", "rejected": "Very far."},
    ])


def test_shp_bad_label(tmp_path):
    with pytest.raises(DataError, match=r"rows.jsonl row 1: field 'labels' should be 0 or 1 but is 2"):
        load_rows("stanfordnlp/SHP", tmp_path, [shp_row("Q?", "a", "b", 2)])


def test_sharegpt_vicuna_markers_become_turns(tmp_path):
    rows = [{"prompt": "USER: Write a haiku about rain. ASSISTANT:", "label": "Soft rain on the roof."},
            {"prompt": "USER: Hi ASSISTANT: Hello! USER: Tell me a joke. ASSISTANT:",
             "label": "Why did the chicken cross the road?"}]
    got, sd = load_rows("pvduy/sharegpt_alpaca_oa_vicuna_format", tmp_path, rows)
    same(got, [
        {"messages": user("Write a haiku about rain."), "chosen": "Soft rain on the roof.", "rejected": None},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": "Tell me a joke."}],
         "chosen": "Why did the chicken cross the road?", "rejected": None},
    ])
    assert not sd.pairwise


def test_zhihu(tmp_path):
    rows = [{"INSTRUCTION": "如何学习编程？", "RESPONSE": "多写代码。", "SOURCE": "Zhihu",
             "METADATA": "{\"upvotes\": 3}"},
            {"INSTRUCTION": "什么是机器学习？", "RESPONSE": "让机器从数据中学习。", "SOURCE": "Zhihu",
             "METADATA": "{}"}]
    got, _ = load_rows("wangrui6/Zhihu-KOL", tmp_path, rows)
    same(got, [{"messages": user("如何学习编程？"), "chosen": "多写代码。", "rejected": None},
               {"messages": user("什么是机器学习？"), "chosen": "让机器从数据中学习。", "rejected": None}])


def passage(docid, text):
    return {"docid": docid, "title": "标题", "text": text}


def test_miracl_zh(tmp_path):
    rows = [{"query_id": "1", "query": "长城有多长？",
             "positive_passages": [passage("d1", "长城约两万公里。"), passage("d2", "其他")],
             "negative_passages": [passage("d3", "长江很长。")]},
            {"query_id": "2", "query": "熊猫吃什么？", "positive_passages": [passage("d4", "竹子。")],
             "negative_passages": [passage("d5", "熊猫是黑白的。"), passage("d6", "x")]}]
    got, sd = load_rows("Cohere/miracl-zh-queries-22-12", tmp_path, rows)
    same(got, [{"messages": user("长城有多长？"), "chosen": "长城约两万公里。", "rejected": "长江很长。"},
               {"messages": user("熊猫吃什么？"), "chosen": "竹子。", "rejected": "熊猫是黑白的。"}])
    assert sd.pairwise


def test_miracl_zh_empty_negatives_is_a_bad_row(tmp_path):
    rows = [{"query_id": "1", "query": "问题", "positive_passages": [passage("d1", "答案")],
             "negative_passages": []}]
    with pytest.raises(DataError, match=r"row 1: field 'negative_passages' is an empty list"):
        load_rows("Cohere/miracl-zh-queries-22-12", tmp_path, rows)


def test_miracl_ja_empty_negatives_give_an_sft_row(tmp_path):
    rows = [{"query_id": "1", "query": "富士山の高さは？", "positive_passages": [passage("d1", "3776メートル。")],
             "negative_passages": [passage("d2", "琵琶湖は大きい。")]},
            {"query_id": "2", "query": "日本の首都は？", "positive_passages": [passage("d3", "東京。")],
             "negative_passages": []}]
    got, sd = load_rows("Cohere/miracl-ja-queries-22-12", tmp_path, rows)
    same(got, [{"messages": user("富士山の高さは？"), "chosen": "3776メートル。", "rejected": "琵琶湖は大きい。"},
               {"messages": user("日本の首都は？"), "chosen": "東京。", "rejected": None}])
    assert sd.pairwise


def test_hc3_chinese(tmp_path):
    rows = [{"id": "0", "question": "为什么天是蓝的？", "human_answers": ["因为瑞利散射。", "不知道"],
             "chatgpt_answers": ["天空呈蓝色是因为……"]},
            {"id": "1", "question": "水的沸点？", "human_answers": ["一百度。"], "chatgpt_answers": []}]
    got, _ = load_rows("Hello-SimpleAI/HC3-Chinese", tmp_path, rows)
    same(got, [{"messages": user("为什么天是蓝的？"), "chosen": "因为瑞利散射。", "rejected": None},
               {"messages": user("水的沸点？"), "chosen": "一百度。", "rejected": None}])


def mkqa_row(i, zh, ja, zh_answer, ja_answer):
    def ans(text):
        return [{"type": 5 if text else 1, "entity": "", "text": text, "aliases": []}]
    return {"example_id": i, "query": "english query", "queries": {"en": "english query", "zh_cn": zh, "ja": ja},
            "answers": {"en": ans("en answer"), "zh_cn": ans(zh_answer), "ja": ans(ja_answer)}}


def test_mkqa_chinese_and_japanese(tmp_path):
    rows = [mkqa_row(1, "谁写了哈姆雷特？", "ハムレットを書いたのは誰？", "莎士比亚", "シェイクスピア"),
            mkqa_row(2, "月亮有多远？", "月までの距離は？", "384400公里", "384400キロ"),
            mkqa_row(3, "无法回答的问题", "答えられない質問", None, None)]
    got, sd = load_rows("mkqa-Chinese", tmp_path, rows)
    same(got, [{"messages": user("谁写了哈姆雷特？"), "chosen": "莎士比亚", "rejected": None},
               {"messages": user("月亮有多远？"), "chosen": "384400公里", "rejected": None}])
    # An unanswerable question (null answer text) holds no example: counted, not an error.
    assert sd.stats["filtered_rows"] == 1 and sd.stats["skipped_rows"] == 0
    got, _ = load_rows("mkqa-Japanese", tmp_path, rows)
    same(got, [{"messages": user("ハムレットを書いたのは誰？"), "chosen": "シェイクスピア", "rejected": None},
               {"messages": user("月までの距離は？"), "chosen": "384400キロ", "rejected": None}])


def test_mkqa_dict_of_lists_layout():
    # `datasets` may store a sequence of structs as a dict of lists; both layouts work.
    row = {"queries": {"zh_cn": "问题"}, "answers": {"zh_cn": {"type": [5], "entity": [""],
                                                             "text": ["答案"], "aliases": [[]]}}}
    assert adapt_rows("mkqa-Chinese", [row]) == [{"messages": user("问题"), "chosen": "答案",
                                                  "rejected": None}]


def test_qg_jaquad(tmp_path):
    rows = [{"answer": "1869年", "paragraph_question": "…", "question": "東京はいつ首都になった？",
             "sentence": "東京は1869年に首都となった。", "paragraph": "東京は……", "sentence_answer": "…",
             "paragraph_answer": "…", "paragraph_sentence": "…", "paragraph_id": "p1"},
            {"answer": "富士山", "paragraph_question": "…", "question": "日本一高い山は？",
             "sentence": "日本一高い山は富士山である。", "paragraph": "…", "sentence_answer": "…",
             "paragraph_answer": "…", "paragraph_sentence": "…", "paragraph_id": "p2"}]
    got, _ = load_rows("lmqg/qg_jaquad", tmp_path, rows)
    same(got, [{"messages": user("東京はいつ首都になった？"), "chosen": "東京は1869年に首都となった。", "rejected": None},
               {"messages": user("日本一高い山は？"), "chosen": "日本一高い山は富士山である。", "rejected": None}])


def test_qag_jaquad(tmp_path):
    rows = [{"paragraph": "京都は古い都である。", "questions": ["京都はどんな都？", "他の質問"],
             "answers": ["古い都", "x"], "questions_answers": "question: 京都はどんな都?, answer: 古い都"},
            {"paragraph": "大阪は食の街だ。", "questions": ["大阪は何の街？"], "answers": ["食の街"],
             "questions_answers": "…"}]
    got, _ = load_rows("lmqg/qag_jaquad", tmp_path, rows)
    same(got, [{"messages": user("京都はどんな都？"), "chosen": "京都は古い都である。", "rejected": None},
               {"messages": user("大阪は何の街？"), "chosen": "大阪は食の街だ。", "rejected": None}])


def test_named_schema_error_names_file_row_and_nested_field(tmp_path):
    rows = [webgpt_row("Q1?", "a", 1.0, "b", 0.0), {"answer_0": "a", "answer_1": "b", "score_0": 1,
                                                    "score_1": 0, "question": {"id": "x"}}]
    with pytest.raises(DataError) as e:
        load_rows("openai/webgpt_comparisons", tmp_path, rows)
    msg = str(e.value)
    assert "rows.jsonl row 2: field 'question.full_text' is missing" in msg
    assert "openai/webgpt_comparisons" in msg and "--skip-bad-rows" in msg and "\n" not in msg


def test_named_schema_skip_bad_rows(tmp_path):
    rows = [{"prompt": "\n\nHuman: Hi\n\nAssistant:", "chosen": " Hello", "rejected": " Go away"},
            {"prompt": "\n\nHuman: Hi\n\nAssistant:", "chosen": " Hello"},
            {"prompt": "\n\nHuman: Bye\n\nAssistant:", "chosen": " Bye!", "rejected": ""}]
    with pytest.raises(DataError, match=r"row 2: field 'rejected' is missing"):
        load_rows("Dahoas/rm-static", tmp_path, rows)
    got, sd = load_rows("Dahoas/rm-static", tmp_path, rows, skip_bad_rows=True)
    assert got == [{"messages": user("Hi"), "chosen": "Hello", "rejected": "Go away"}]
    assert sd.stats["skipped_rows"] == 2 and sd.stats["rows_kept"] == 1 and sd.stats["rows_in"] == 3


def test_adapt_rows_directly_numbers_and_errors():
    rows = [{"prompt": "Hi", "chosen": "a", "rejected": "b"}, {"prompt": "Yo", "chosen": 3, "rejected": "b"}]
    with pytest.raises(DataError, match=r"^mine row 2: field 'chosen' should be text but is int \(3\)"):
        adapt_rows("Dahoas/synthetic-instruct-gptj-pairwise", rows, source="mine")
    stats = {}
    out = adapt_rows("Dahoas/synthetic-instruct-gptj-pairwise", rows, skip_bad_rows=True, stats=stats)
    assert out == [{"messages": user("Hi"), "chosen": "a", "rejected": "b"}]
    assert stats == {"rows_in": 2, "skipped_rows": 1, "filtered_rows": 0, "rows_kept": 1}


def test_adapt_rows_unknown_name():
    with pytest.raises(DataError, match="no adapter; known names: Dahoas/rm-static"):
        adapt_rows("nobody/nothing", [])


def test_get_field_paths():
    row = {"a": {"b": [{"c": "x"}]}}
    assert get_field(row, "a.b[0].c") == "x"
    with pytest.raises(RowError, match=r"field 'a.b' has no item 1"):
        get_field(row, "a.b[1].c")
    with pytest.raises(RowError, match=r"field 'a.b\[0\].c' should be a list but is str"):
        get_field(row, "a.b[0].c[0]")
    with pytest.raises(RowError, match=r"field 'a.b' should be an object with a 'x' field but is list"):
        get_field(row, "a.b.x")


def test_hub_name_offline_says_to_pass_a_local_file():
    with pytest.raises(DataError) as e:
        load_source("Dahoas/rm-static")
    msg = str(e.value)
    assert "'Dahoas/rm-static'" in msg and "local file" in msg and "Dahoas/rm-static:" in msg
