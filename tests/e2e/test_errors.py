"""User errors: exit status 2 and ONE line `chatrl: error: ...` that names what is wrong, no
traceback, and no output folder that looks finished.

Errors found while parsing the config run the real CLI entry point in-process (cheap); errors
raised once a step has started (data, model, precision) run `python -m chatrl` in a subprocess.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import TINY, chatrl, cli_error, error_line, losses

BAD_ROW = 7
N_ROWS = 20


@pytest.fixture
def rows_file(tmp_path):
    """prompt/chosen/rejected JSONL whose line 7 has no `chosen`."""
    path = tmp_path / "pairs.jsonl"
    with path.open("w") as f:
        for i in range(1, N_ROWS + 1):
            row = {"prompt": f"Tell me about item {i}.", "chosen": f"Item {i} is great and lovely.",
                   "rejected": f"Item {i} is bad."}
            if i == BAD_ROW:
                del row["chosen"]
            f.write(json.dumps(row) + "\n")
    return path


# ----------------------------------------------------------------------------- (a) bad data row

def test_bad_row_names_file_row_and_field_and_leaves_no_model(rows_file, tmp_path):
    out = tmp_path / "out"
    proc = chatrl("sft", *TINY, "--data_path", rows_file, "--output_dir", out, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = error_line(proc.stderr)
    assert proc.stderr.strip() == line  # nothing else on stderr
    assert str(rows_file) in line and f"row {BAD_ROW}:" in line and "'chosen'" in line, line
    assert "--skip-bad-rows" in line  # says how to get past it
    assert not (out / "model").exists()
    assert not (out / "checkpoints").exists()


def test_skip_bad_rows_trains_on_the_rest(rows_file, tmp_path):
    out = tmp_path / "out"
    proc = chatrl("sft", *TINY, "--data_path", rows_file, "--output_dir", out, "--skip_bad_rows",
                  "--data_split", "10,0,0", "--per_device_train_batch_size", "4", "--max_steps", "2")
    # 19 good rows -> seeded 9:1 split: round(1.9) = 2 eval rows, 17 training rows.
    assert "sft: 17 training rows, 2 eval rows" in proc.stderr, proc.stderr
    assert len(losses(out)) == 2 and all(math.isfinite(x) for x in losses(out))
    assert (out / "model" / "config.json").exists()


# ----------------------------------------------------------------------------- config errors

def test_data_split_needs_three_parts(capsys, tmp_path):
    line = cli_error(capsys, "sft", "--model_name_or_path", "tiny", "--output_dir", tmp_path / "o",
                     "--data_split", "2,4")
    assert '"2,4"' in line and "needs 3" in line, line
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_only_optimize_lora_needs_lora_dim(capsys, tmp_path):
    line = cli_error(capsys, "sft", "--model_name_or_path", "tiny", "--output_dir", tmp_path / "o",
                     "--only_optimize_lora")
    assert "--only-optimize-lora" in line and "--lora-dim" in line, line
    # the kebab spelling and the RM step say the same
    line = cli_error(capsys, "rm", "--model-name-or-path", "tiny", "--output-dir", tmp_path / "o",
                     "--only-optimize-lora", "--lora-dim", "0")
    assert "--lora-dim" in line, line
    assert not (tmp_path / "o").exists()


def test_unknown_override_key_is_named(capsys, tmp_path):
    line = cli_error(capsys, "sft", "--model_name_or_path", "tiny", "--output_dir", tmp_path / "o",
                     "learning_rat=1e-4")
    assert "'learning_rat'" in line and "learning_rate" in line, line  # named, with a suggestion
    line = cli_error(capsys, "sft", "--model_name_or_path", "tiny", "--output_dir", tmp_path / "o",
                     "max_steps=abc")
    assert "max_steps" in line and "'abc'" in line and "int" in line, line
    line = cli_error(capsys, "sft", "--model_name_or_path", "tiny", "--output_dir", tmp_path / "o",
                     "max_steps")
    assert "key=value" in line, line
    # an override that belongs to another step is refused for this one
    line = cli_error(capsys, "sft", "--model_name_or_path", "tiny", "--output_dir", tmp_path / "o",
                     "rm_loss=dschat")
    assert "'rm_loss'" in line, line
    assert not (tmp_path / "o").exists()


def test_unknown_preset_and_missing_config_file(capsys, tmp_path):
    line = cli_error(capsys, "sft", "--output_dir", tmp_path / "o", "--preset", "no-such-preset")
    assert "'no-such-preset'" in line and "cpu-default" in line, line
    missing = tmp_path / "missing.yaml"
    line = cli_error(capsys, "sft", "--output_dir", tmp_path / "o", "--config", missing)
    assert str(missing) in line and "does not exist" in line, line
    bad = tmp_path / "bad.yaml"
    bad.write_text("sft:\n  learning_rat: 0.1\n")
    line = cli_error(capsys, "sft", "--output_dir", tmp_path / "o", "--config", bad)
    assert str(bad) in line and "'learning_rat'" in line, line


# ----------------------------------------------------------------------------- errors at run time

def test_unknown_model_folder(tmp_path):
    missing = tmp_path / "no-such-model"
    proc = chatrl("sft", "--model_name_or_path", missing, "--output_dir", tmp_path / "o", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = error_line(proc.stderr)
    assert str(missing) in line and "does not exist" in line, line
    assert not (tmp_path / "o" / "model").exists()

    empty = tmp_path / "empty-folder"
    empty.mkdir()
    proc = chatrl("rm", "--model_name_or_path", empty, "--output_dir", tmp_path / "o2", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = error_line(proc.stderr)
    assert str(empty) in line and "config.json" in line, line
    assert not (tmp_path / "o2" / "model").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is valid on a CUDA GPU")
def test_fp16_on_cpu_is_refused(tmp_path):
    proc = chatrl("sft", *TINY, "--dtype", "fp16", "--output_dir", tmp_path / "o", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = error_line(proc.stderr)
    assert "--dtype fp16" in line and "GPU" in line and "bf16" in line and "fp32" in line, line
    assert not (tmp_path / "o" / "model").exists()
