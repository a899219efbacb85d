"""Issue 9: bad models and bad input are refused in one line (or skipped), never used silently.

- PPO with a reward model / critic whose tokenizer differs from the actor's (here: the same size,
  two token ids swapped) is refused, naming both tokenizers.
- PPO with a critic that has no trained value head is refused unless
  --allow-untrained-reward-head, which then trains (with a warning).
- A truncated safetensors file (model or value head) and a config.json with a wrongly typed field
  are one error line, exit 2.
- `chatrl chat` given bytes that are not UTF-8 skips that line with a warning; the conversation
  goes on.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from fault_helpers import assert_unfinished, chatrl_faulty, step_args
from helpers import error_line


def _ppo(refs, out, critic=None, *extra):
    actor, ref_critic = refs.models()
    args = step_args("ppo", out, (actor, critic or ref_critic))
    args[args.index("--max_steps") + 1] = "1"
    return chatrl_faulty(args + list(extra))


def test_reward_model_with_another_tokenizer_is_refused(refs, tmp_path):
    critic = shutil.copytree(refs("rm") / "model", tmp_path / "rm-swapped")
    tok_file = critic / "tokenizer.json"
    tok = json.loads(tok_file.read_text())
    vocab = tok["model"]["vocab"]
    vocab["a"], vocab["e"] = vocab["e"], vocab["a"]  # same size, two ids swapped
    tok_file.write_text(json.dumps(tok))
    out = tmp_path / "out"
    p = _ppo(refs, out, str(critic))
    assert p.returncode == 2, p.stderr[-3000:]
    line = error_line(p.stderr)
    actor = refs.models()[0]
    assert "tokenizer" in line and str(critic) in line and actor in line, line
    assert_unfinished(out, "ppo")


def test_critic_without_value_head_is_refused_unless_allowed(refs, tmp_path):
    from chatrl.models import resolve_model_path

    base = resolve_model_path("tiny")
    p = _ppo(refs, tmp_path / "out", base)
    assert p.returncode == 2, p.stderr[-3000:]
    line = error_line(p.stderr)
    assert base in line and "value head" in line and "--allow-untrained-reward-head" in line, line
    assert_unfinished(tmp_path / "out", "ppo")

    p = _ppo(refs, tmp_path / "allowed", base, "--allow-untrained-reward-head")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "warning" in p.stderr and "random" in p.stderr
    assert (tmp_path / "allowed" / "actor" / "chatrl.json").exists()


def test_truncated_safetensors_and_mistyped_config_are_one_line(refs, tmp_path):
    sft_model, rm_model = refs("sft") / "model", refs("rm") / "model"
    cases = []
    bad = shutil.copytree(sft_model, tmp_path / "truncated")
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    cases.append(("sft", bad, "model.safetensors"))
    head = shutil.copytree(rm_model, tmp_path / "truncated-head")
    (head / "value_head.safetensors").write_bytes((head / "value_head.safetensors").read_bytes()[:20])
    cases.append(("rm", head, "value_head.safetensors"))
    typed = shutil.copytree(sft_model, tmp_path / "mistyped")
    config = json.loads((typed / "config.json").read_text())
    config["num_hidden_layers"] = "two"
    (typed / "config.json").write_text(json.dumps(config))
    cases.append(("sft", typed, "num_hidden_layers"))
    for step, model, what in cases:
        args = step_args(step, tmp_path / f"out-{model.name}")
        args[args.index("--model_name_or_path") + 1] = str(model)
        p = chatrl_faulty(args)
        assert p.returncode == 2, p.stderr[-3000:]
        line = error_line(p.stderr)
        assert str(model) in line and what in line, line


def test_chat_skips_input_that_is_not_utf8(lively_model_path):
    proc = subprocess.run(
        [sys.executable, "-m", "chatrl", "chat", "--path", lively_model_path, "--max_new_tokens", "4",
         "--temperature", "0"],
        input=b"first turn\n\xff\xfe broken \xc3\x28 bytes\nsecond turn\n", capture_output=True,
        timeout=120)
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert "not valid UTF-8" in err and "line 2" in err, err
    assert out.count("Assistant: ") == 2 and "You: second turn" in out and out.rstrip().endswith("Goodbye.")

