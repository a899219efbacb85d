"""`--report-to`: the flag's checks, and W&B (offline) receiving exactly the JSONL log's metrics."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from chatrl.errors import ConfigError
from chatrl.tracking import check_report_to, parse_report_to


def test_report_to_values():
    assert parse_report_to("tensorboard,jsonl") == {"tensorboard", "jsonl"}
    assert parse_report_to(" WandB , tensorboard ") == {"wandb", "tensorboard"}
    assert parse_report_to("none") == set()
    with pytest.raises(ConfigError, match="names mlflow; use a comma-separated list of tensorboard, wandb, jsonl"):
        parse_report_to("tensorboard,mlflow")


def test_missing_wandb_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ConfigError, match="needs the wandb package, which is not installed; pip install wandb"):
        check_report_to("tensorboard,wandb")
    check_report_to("tensorboard,jsonl")  # fine without it


def read_wandb_file(path: Path) -> list:
    """The records of an offline run's .wandb file: a ':W&B' header, then LevelDB's log format
    (32 KiB blocks of [crc32, length, type] + data; FULL=1, FIRST=2, MIDDLE=3, LAST=4)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, header = 32768, 7
    pos, records, pending = 7, [], b""
    while pos + header <= len(data):
        left = block - pos % block
        if left < header:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + header])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + header:pos + header + length]
        pos += header + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            records.append(pending + chunk)
    out = []
    for raw in records:
        rec = pb.Record()
        rec.ParseFromString(raw)
        out.append(rec)
    return out


def test_wandb_offline_gets_the_jsonl_metrics(tmp_path):
    pytest.importorskip("wandb", reason="the W&B test needs the optional wandb package (pip install wandb)")
    out = tmp_path / "sft"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_PROJECT": "chatrl-test",
           "WANDB_DISABLE_GIT": "true", "WANDB_DISABLE_CODE": "true"}
    proc = subprocess.run(
        [sys.executable, "-m", "chatrl", "sft", "--model_name_or_path", "tiny", "--max_seq_len", "128",
         "--progress", "false", "--max_steps", "3", "--per_device_train_batch_size", "4",
         "--output_dir", str(out), "--report-to", "tensorboard,wandb,jsonl"],
        capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]

    jsonl = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in jsonl} == {"train", "eval"} and len(jsonl) == 4
    expected = []
    for row in jsonl:
        metrics = {(k if k.startswith(f"{row['kind']}/") else f"{row['kind']}/{k}"): v
                   for k, v in row.items() if k not in ("step", "kind", "time")}
        expected.append({"step": row["step"], **metrics})

    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs
    records = read_wandb_file(runs[0])
    history = []
    for rec in records:
        if rec.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            history.append({k: v for k, v in items.items() if not k.startswith("_")})
    assert history == expected  # every row, every metric, the same values (JSON floats round-trip)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))

    # The run's resolved config went along.
    config = {}
    for rec in records:
        kind = rec.WhichOneof("record_type")
        updates = rec.run.config.update if kind == "run" else rec.config.update if kind == "config" else []
        config.update({u.key: json.loads(u.value_json) for u in updates})
    assert config["max_steps"] == 3 and config["report_to"] == "tensorboard,wandb,jsonl"
    assert config["output_dir"] == str(out)


def test_train_passes_report_to_to_every_step():
    from chatrl.pipeline import build_parser, plan_steps

    plans = plan_steps(build_parser().parse_args(["--actor-model", "tiny", "--report-to", "jsonl"]))
    assert {name: p.report_to for name, p in plans.items()} == {"sft": "jsonl", "rm": "jsonl", "ppo": "jsonl"}
