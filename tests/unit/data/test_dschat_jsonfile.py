"""DeepSpeed-Chat's "local/jsonfile" data path: data/train.json and data/eval.json under the
current folder, rows with prompt / chosen / rejected, prompts in its " Human: ... Assistant:" form."""

import json

import pytest

from chatrl.data import load_source
from chatrl.errors import DataError


def write(folder, train, eval_, eval_as_lines=True):
    (folder / "data").mkdir()
    (folder / "data" / "train.json").write_text(json.dumps(train))
    text = "".join(json.dumps(r) + "\n" for r in eval_) if eval_as_lines else json.dumps(eval_)
    (folder / "data" / "eval.json").write_text(text)


def test_reads_both_files_as_train_and_eval(tmp_path, monkeypatch):
    write(tmp_path,
          [{"prompt": " Human: Name a color. Assistant:", "chosen": "Blue.", "rejected": "No."},
           {"prompt": "Human: Hi Assistant: Hello! Human: Name a fruit. Assistant:", "chosen": "An apple.",
            "rejected": None}],
          [{"prompt": " Human: Say hi. Assistant:", "chosen": "Hi!", "rejected": "Bye."},
           {"prompt": " Human: Count to two. Assistant:", "chosen": "One, two.", "rejected": "Three."}])
    monkeypatch.chdir(tmp_path)
    sd = load_source("local/jsonfile")
    assert sd.pairwise and sd.stats["eval_from"] == "eval split"
    assert list(sd.train) == [
        {"messages": [{"role": "user", "content": "Name a color."}], "chosen": "Blue.", "rejected": "No."},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": "Name a fruit."}], "chosen": "An apple.", "rejected": None}]
    assert list(sd.eval) == [
        {"messages": [{"role": "user", "content": "Say hi."}], "chosen": "Hi!", "rejected": "Bye."},
        {"messages": [{"role": "user", "content": "Count to two."}], "chosen": "One, two.",
         "rejected": "Three."}]


def test_missing_files_name_the_paths_and_the_way_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"data/train.json and .*data/eval.json do not exist.*--data-path FILE"):
        load_source("local/jsonfile")


def test_a_bad_row_names_its_file_and_row(tmp_path, monkeypatch):
    write(tmp_path, [{"prompt": "Human: a Assistant:", "chosen": "b"}],
          [{"prompt": "Human: c Assistant:", "chosen": "d"}, {"prompt": "Human: e Assistant:"}])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"data/eval.json.*row 2.*chosen"):
        load_source("local/jsonfile")
