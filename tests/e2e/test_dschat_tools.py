"""DeepSpeed-Chat's evaluation and chat command forms, run as `python -m chatrl.dschat.<tool>`
with DeepSpeed-Chat's arguments, on models in DeepSpeed-Chat's own folder layout:

    rw_eval.py --model_name_or_path RM            == chatrl eval reward --path RM
    prompt_eval.py --model_name_or_path_baseline A --model_name_or_path_finetune B
                                                  == chatrl eval prompts --base A --finetuned B (greedy)
    chat.py --path ACTOR --max_new_tokens N       == chatrl chat, plus DeepSpeed-Chat's quit / clear
"""

from __future__ import annotations

import json

import pytest

import dschat_helpers as H
from helpers import PYTHON, chatrl


def tool(name: str) -> list[str]:
    return [PYTHON, "-m", f"chatrl.dschat.{name}"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from chatrl.models import resolve_model_path

    root = tmp_path_factory.mktemp("dschat")
    base = resolve_model_path("tiny-opt")
    return {"base": base, "actor": H.make_dschat_actor(base, root / "actor"),
            "rm": H.make_dschat_reward(base, root / "rm", seed=1)}


def test_rw_eval(folders):
    got = chatrl("--model_name_or_path", folders["rm"], "--num_padding_at_beginning", "1", "--json",
                 launcher=tool("rw_eval"))
    want = chatrl("eval", "reward", "--path", folders["rm"], "--json")
    res = json.loads(got.stdout.strip().splitlines()[-1])
    assert res == json.loads(want.stdout.strip().splitlines()[-1])
    assert res["eval/pairs"] > 0 and 0 <= res["accuracy"] <= 1


def test_prompt_eval(folders):
    args = ["--max_new_tokens", "8", "--num-prompts", "3", "--json"]
    got = chatrl("--model_name_or_path_baseline", folders["base"], "--model_name_or_path_finetune",
                 folders["actor"], "--num_beams", "1", "--top_k", "4", "--language", "English", *args,
                 launcher=tool("prompt_eval"))
    want = chatrl("eval", "prompts", "--base", folders["base"], "--finetuned", folders["actor"],
                  "--temperature", "0", *args)
    res = json.loads(got.stdout.strip().splitlines()[-1])
    assert res == json.loads(want.stdout.strip().splitlines()[-1])
    assert len(res["base"]["answers"]) == len(res["finetuned"]["answers"]) == 3


def test_chat_with_dschat_words(folders):
    proc = chatrl("--path", folders["actor"], "--max_new_tokens", "6", "--temperature", "0",
                  launcher=tool("chat"), stdin="Hello there\nclear\nTell me about rain\nquit\nnever read\n")
    out = proc.stdout
    assert out.count("Assistant: ") == 2
    assert "(conversation cleared)" in out and out.rstrip().endswith("Goodbye.")
    assert "You: Hello there" in out and "You: Tell me about rain" in out and "never read" not in out


def test_tool_errors_are_one_line(tmp_path):
    proc = chatrl("--model_name_or_path", tmp_path / "missing", launcher=tool("rw_eval"), check=False)
    assert proc.returncode == 2
    assert [line for line in proc.stderr.splitlines() if line.startswith("chatrl: error:")]
    assert "Traceback" not in proc.stderr
