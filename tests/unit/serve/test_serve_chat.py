"""Terminal chat: history across turns, /reset, /quit, end of input and Ctrl-C exit cleanly."""

import argparse
import io
import subprocess
import sys

import pytest

from chatrl.serve.chat import add_chat_args, main, run_chat


def test_history_reset_and_end_of_input(chat_model):
    prompts = []
    out = io.StringIO()
    stdin = io.StringIO("hello there\nsecond question\n/reset\nthird\n")
    rc = run_chat(chat_model, max_new_tokens=8, temperature=0, input_stream=stdin,
                  output_stream=out, on_prompt=prompts.append)
    assert rc == 0 and len(prompts) == 3
    first_answer = chat_model.generate("hello there", max_new_tokens=8, temperature=0).text
    # Turn 2 sees turn 1 (question and answer); after /reset, turn 3 sees only itself.
    assert prompts[1] == chat_model.render([
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": first_answer},
        {"role": "user", "content": "second question"}])
    assert prompts[2] == chat_model.render("third")
    text = out.getvalue()
    assert "You: second question" in text and "(conversation cleared)" in text
    assert f"Assistant: {first_answer}\n" in text
    assert text.rstrip().endswith("Goodbye.")


def test_quit_stops_reading(chat_model):
    prompts, out = [], io.StringIO()
    rc = run_chat(chat_model, max_new_tokens=4, temperature=0, input_stream=io.StringIO("a\n/quit\nb\n"),
                  output_stream=out, on_prompt=prompts.append)
    assert rc == 0 and len(prompts) == 1 and "You: b" not in out.getvalue()


def test_ctrl_c_exits_cleanly(chat_model):
    class CtrlC(io.StringIO):
        def readline(self, *args):
            raise KeyboardInterrupt

    out = io.StringIO()
    assert run_chat(chat_model, input_stream=CtrlC(), output_stream=out) == 0
    assert out.getvalue().rstrip().endswith("Goodbye.")


@pytest.mark.parametrize("flag", ["--max_new_tokens", "--max-new-tokens"])
def test_deepspeed_chat_flag_spellings(flag):
    args = add_chat_args(argparse.ArgumentParser()).parse_args(["--path", "m", flag, "64"])
    assert args.max_new_tokens == 64 and args.path == "m"


def test_bad_setting_is_reported_before_loading(capsys):
    assert main(["--path", "does-not-matter", "--temperature", "-1"]) == 2
    assert "temperature is -1.0" in capsys.readouterr().err


def test_piped_stdin_subprocess(lively_model_path):
    """`python -m chatrl.serve.chat` as DeepSpeed-Chat users call it, with piped input."""
    proc = subprocess.run(
        [sys.executable, "-m", "chatrl.serve.chat", "--path", lively_model_path, "--max_new_tokens", "6",
         "--temperature", "0", "--show-prompt"],
        input="first turn\nsecond turn\n/reset\nthird turn\n", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "RuntimeWarning" not in proc.stderr
    prompts = proc.stderr.split("--- prompt ---")[1:]
    assert len(prompts) == 3
    assert "first turn" in prompts[1] and "second turn" in prompts[1]
    assert "first turn" not in prompts[2] and "third turn" in prompts[2]
    assert proc.stdout.count("Assistant: ") == 3 and proc.stdout.rstrip().endswith("Goodbye.")
