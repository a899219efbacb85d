"""Local sources: JSON, JSONL, Parquet, CSV, chat-style messages, save_to_disk folders, folders of
files; bad rows (missing field, wrong type, empty text) and --skip-bad-rows; the eval split."""

import csv
import json

import pytest
from datasets import Dataset, DatasetDict

from chatrl.data import load_source
from chatrl.errors import DataError


def user(text):
    return [{"role": "user", "content": text}]


ROWS = [{"prompt": f"Question {i}?", "chosen": f"Good answer {i}.", "rejected": f"Bad answer {i}."}
        for i in range(1, 11)]
UNIFIED = [{"messages": user(f"Question {i}?"), "chosen": f"Good answer {i}.",
            "rejected": f"Bad answer {i}."} for i in range(1, 11)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def all_rows(sd):
    rows = list(sd.train) + list(sd.eval)
    return sorted(rows, key=lambda r: int(r["chosen"].split()[-1].rstrip(".")))


def test_jsonl_with_seeded_9_to_1_eval_split(tmp_path):
    f = write_jsonl(tmp_path / "data.jsonl", ROWS)
    sd = load_source(str(f), seed=0)
    assert all_rows(sd) == UNIFIED
    assert (len(sd.train), len(sd.eval)) == (9, 1) and sd.pairwise
    assert sd.stats["eval_from"] == "seeded 9:1 split"
    assert sd.stats["rows_in"] == sd.stats["rows_kept"] == 10 and sd.stats["skipped_rows"] == 0
    # The split is fixed by the seed, and a different seed gives another one.
    assert list(load_source(str(f), seed=0).eval) == list(sd.eval)
    evals = {load_source(str(f), seed=s).eval[0]["chosen"] for s in range(8)}
    assert len(evals) > 1


def test_json_array_and_split_object(tmp_path):
    f = tmp_path / "data.json"
    f.write_text(json.dumps(ROWS))
    assert all_rows(load_source(str(f))) == UNIFIED
    g = tmp_path / "splits.json"
    g.write_text(json.dumps({"train": ROWS[:8], "test": ROWS[8:]}))
    sd = load_source(str(g))
    assert list(sd.train) == UNIFIED[:8] and list(sd.eval) == UNIFIED[8:]
    assert sd.stats["eval_from"] == "eval split"


def test_json_that_is_not_rows(tmp_path):
    f = tmp_path / "data.json"
    f.write_text(json.dumps({"prompt": "x", "chosen": "y"}))
    with pytest.raises(DataError, match="not a list of rows"):
        load_source(str(f))


def test_parquet(tmp_path):
    f = tmp_path / "data.parquet"
    Dataset.from_list(ROWS).to_parquet(str(f))
    assert all_rows(load_source(str(f))) == UNIFIED


def test_csv_with_sft_rows_and_empty_rejected(tmp_path):
    f = tmp_path / "data.csv"
    with f.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["prompt", "response", "rejected"])
        w.writerow(["Hi?", "Hello.", ""])
        w.writerow(["Multi\nline?", "Yes, it works.", "No."])
        w.writerow(["Third?", "Answer three.", ""])
    sd = load_source(str(f), seed=0)
    got = sorted(list(sd.train) + list(sd.eval), key=lambda r: r["chosen"])
    assert got == [{"messages": user("Third?"), "chosen": "Answer three.", "rejected": None},
                   {"messages": user("Hi?"), "chosen": "Hello.", "rejected": None},
                   {"messages": user("Multi\nline?"), "chosen": "Yes, it works.", "rejected": "No."}]
    assert sd.pairwise  # at least one row has a rejected answer


def test_csv_row_numbers_are_spreadsheet_lines(tmp_path):
    f = tmp_path / "data.csv"
    f.write_text('prompt,chosen\n"two\nlines",ok\nhi,\n')
    # Line 1 header, lines 2-3 the first row (a quoted newline), line 4 the bad row.
    with pytest.raises(DataError, match=r"data.csv row 4: field 'chosen' is missing"):
        load_source(str(f))


def test_chat_style_messages(tmp_path):
    rows = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4"}]},
        # ShareGPT spelling; the last assistant turn is the response.
        {"messages": [{"from": "human", "value": "Name a fruit"}, {"from": "gpt", "value": "Apple"}]},
        # messages as the prompt, chosen/rejected as message lists or strings.
        {"messages": [{"role": "user", "content": "Color?"}],
         "chosen": [{"role": "user", "content": "Color?"}, {"role": "assistant", "content": "Blue"}],
         "rejected": "Loud"},
    ]
    f = write_jsonl(tmp_path / "chat.jsonl", rows)
    sd = load_source(str(f), seed=0)
    got = sorted(list(sd.train) + list(sd.eval), key=lambda r: r["chosen"])
    assert got == [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"}],
         "chosen": "4", "rejected": None},
        {"messages": user("Name a fruit"), "chosen": "Apple", "rejected": None},
        {"messages": user("Color?"), "chosen": "Blue", "rejected": "Loud"},
    ]


def test_prompt_with_human_assistant_markers_is_parsed(tmp_path):
    rows = [{"prompt": "Human: Hi\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant:",
             "chosen": "Fine, thanks."}, {"prompt": "Plain question?", "chosen": "Plain answer."}]
    sd = load_source(str(write_jsonl(tmp_path / "d.jsonl", rows)), seed=0)
    got = sorted(list(sd.train) + list(sd.eval), key=lambda r: r["chosen"])
    assert got == [{"messages": [{"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": "Hello!"},
                                 {"role": "user", "content": "How are you?"}],
                    "chosen": "Fine, thanks.", "rejected": None},
                   {"messages": user("Plain question?"), "chosen": "Plain answer.", "rejected": None}]
    assert not sd.pairwise


def test_save_to_disk_dataset_and_datasetdict(tmp_path):
    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "one"))
    assert all_rows(load_source(str(tmp_path / "one"))) == UNIFIED
    DatasetDict({"train": Dataset.from_list(ROWS[:7]),
                 "validation": Dataset.from_list(ROWS[7:])}).save_to_disk(str(tmp_path / "dict"))
    sd = load_source(str(tmp_path / "dict"))
    assert list(sd.train) == UNIFIED[:7] and list(sd.eval) == UNIFIED[7:]


def test_save_to_disk_folder_with_a_named_schema(tmp_path):
    rows = [{"prompt": "\n\nHuman: Hi\n\nAssistant:", "chosen": " Hello", "rejected": " Bye"}] * 2
    DatasetDict({"train": Dataset.from_list(rows), "test": Dataset.from_list(rows[:1])}).save_to_disk(
        str(tmp_path / "hh"))
    sd = load_source(f"Dahoas/rm-static:{tmp_path / 'hh'}")
    assert len(sd.train) == 2 and len(sd.eval) == 1
    assert sd.eval[0] == {"messages": user("Hi"), "chosen": "Hello", "rejected": "Bye"}


def test_folder_of_files_uses_file_names_for_the_eval_split(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS[:6])
    Dataset.from_list(ROWS[6:8]).to_parquet(str(tmp_path / "more.parquet"))
    write_jsonl(tmp_path / "rm_test.jsonl", ROWS[8:])
    (tmp_path / "README.md").write_text("not data")
    sd = load_source(str(tmp_path))
    assert sorted(r["chosen"] for r in sd.train) == sorted(r["chosen"] for r in UNIFIED[:8])
    assert list(sd.eval) == UNIFIED[8:]
    assert sd.stats["rows_in"] == 10


def test_missing_field_row_7_is_one_line_error(tmp_path):
    rows = ROWS[:6] + [{"prompt": "Question 7?", "rejected": "Bad."}] + ROWS[7:]
    f = write_jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(DataError) as e:
        load_source(str(f))
    msg = str(e.value)
    assert "data.jsonl row 7: field 'chosen' is missing" in msg
    assert "--skip-bad-rows" in msg and "\n" not in msg
    sd = load_source(str(f), skip_bad_rows=True)
    assert sd.stats["skipped_rows"] == 1 and sd.stats["rows_kept"] == 9 and sd.stats["rows_in"] == 10
    assert "Question 7?" not in {r["messages"][0]["content"] for r in list(sd.train) + list(sd.eval)}


def test_row_numbers_are_file_lines_with_blank_lines(tmp_path):
    f = tmp_path / "data.jsonl"
    f.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps({"prompt": "x", "chosen": ""}) + "\n")
    with pytest.raises(DataError, match=r"data.jsonl row 3: field 'chosen' is empty"):
        load_source(str(f))


@pytest.mark.parametrize("bad, expected", [
    ({"prompt": "Q?", "chosen": 42}, "field 'chosen' should be text but is int (42)"),
    ({"prompt": ["Q?"], "chosen": "A."}, "field 'prompt[0]' should be a {'role', 'content'} object but is str"),
    ({"prompt": "   ", "chosen": "A."}, "field 'prompt' is empty"),
    ({"prompt": "Q?", "chosen": "A.", "rejected": ""}, "field 'rejected' is empty"),
    ({"prompt": "Q?", "chosen": "A.", "rejected": {"text": "B"}}, "field 'rejected' should be text but is dict"),
    ({"chosen": "A."}, "field 'prompt' is missing"),
    ({"messages": [{"role": "user", "content": "Hi"}]}, "field 'chosen' is missing and `messages` has no assistant turn"),
    ({"messages": [{"role": "robot", "content": "Hi"}]}, "field 'messages[0].role' is 'robot'"),
    ({"messages": [{"role": "assistant", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
     "field 'messages' ends with an assistant turn"),
    ([1, 2], "should be an object"),
])
def test_bad_rows(tmp_path, bad, expected):
    f = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], bad, ROWS[1]])
    with pytest.raises(DataError) as e:
        load_source(str(f))
    assert str(e.value).startswith(f"{f} row 2: ") and expected in str(e.value)
    assert "\n" not in str(e.value)
    sd = load_source(str(f), skip_bad_rows=True)
    assert sd.stats["skipped_rows"] == 1 and len(sd.train) + len(sd.eval) == 2


def test_invalid_json_line(tmp_path):
    f = tmp_path / "data.jsonl"
    f.write_text(json.dumps(ROWS[0]) + "\n{not json\n" + json.dumps(ROWS[1]) + "\n")
    with pytest.raises(DataError, match=r"data.jsonl row 2: is not valid JSON"):
        load_source(str(f))
    assert load_source(str(f), skip_bad_rows=True).stats["skipped_rows"] == 1


def test_all_rows_bad_is_an_error(tmp_path):
    f = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "Q"}])
    with pytest.raises(DataError, match="no usable rows"):
        load_source(str(f), skip_bad_rows=True)


def test_missing_path_and_unknown_names(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_source(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="neither an existing file or folder nor a known dataset"):
        load_source("someone/unknown-set")
    with pytest.raises(DataError, match="does not exist"):
        load_source(f"Dahoas/rm-static:{tmp_path / 'nope.jsonl'}")
    with pytest.raises(DataError, match="unknown data file type '.txt'"):
        (tmp_path / "x.txt").write_text("hi")
        load_source(str(tmp_path / "x.txt"))
    with pytest.raises(DataError, match="holds no data files"):
        (tmp_path / "empty").mkdir()
        load_source(str(tmp_path / "empty"))


def test_demo_source_uses_its_test_split_as_eval():
    sd = load_source("demo")
    assert sd.name == "demo" and sd.pairwise
    assert (len(sd.train), len(sd.eval)) == (600, 100)
    assert set(sd.train.column_names) == {"messages", "chosen", "rejected"}
