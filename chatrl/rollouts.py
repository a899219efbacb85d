"""The rollout log of step 3: what the policy said, token by token, and what PPO made of it.

Every `--log-rollouts-interval` iterations, `log_rollouts` writes
<output_dir>/rollouts/iter_XXXXX.jsonl, one JSON line per sampled answer:

    {"iteration", "index", "prompt", "answer", "reward", "return_total", "length", "ended",
     "token_ids": [...], "tokens": [...],            each answer token and its text
     "logprob", "ref_logprob", "kl", "value", "advantage", "reward_t", "entropy": [...],  per token
     "rewards": {source: score}}                     each reward source on its own

ref_logprob and kl are null without a reference model (KL coefficient 0), value without a
critic (GRPO and the other critic-free algorithms).

reward: the answer's score (after --normalize-reward / the missing-EOS penalty, before the KL
shaping: what GAE saw at the last token); kl: log p - log p_ref of each token (k1); reward_t:
the KL-shaped per-token reward; entropy: of the sampling distribution (softmax(logits / T), before
top-p/top-k) at that token; advantage: as the update used it (whitened, by default).
Rank 0 writes its own rollouts. `chatrl inspect RUN_DIR` (inspector.py) shows them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

ROUND = 5  # decimals kept: enough to read, and files stay small


def _floats(t) -> list[float] | None:
    """None where the run has no such tensor (no reference model at KL 0, no critic)."""
    return None if t is None else [round(float(x), ROUND) for x in t.tolist()]


def _row(t, i: int, n: int):
    return None if t is None else t[i, :n]


def rollout_rows(iteration: int, exp, tokenizer, extra: dict | None = None, start: int = 0) -> list[dict]:
    """One dict per answer of an Experience (chatrl.steps.ppo): see the module docstring.
    extra: more fields, each a value for every row or a sequence with one value per answer."""
    P = exp.prompt_len
    rows = []
    for i in range(exp.batch_size):
        n = int(exp.action_mask[i].sum())
        prompt_ids = exp.sequences[i, :P][exp.attention_mask[i, :P].bool()].tolist()
        ids = exp.sequences[i, P:P + n].tolist()
        row = {
            "iteration": iteration, "index": start + i,
            "prompt": tokenizer.decode(prompt_ids, skip_special_tokens=True).strip(),
            "answer": tokenizer.decode(ids, skip_special_tokens=True),
            "reward": round(float(exp.scores[i]), ROUND),
            "return_total": round(float(exp.rewards[i, :n].sum()), ROUND),
            "length": n,
            "ended": bool(n and ids[-1] == tokenizer.eos_token_id),
            "token_ids": ids,
            "tokens": [tokenizer.decode([t], skip_special_tokens=False) for t in ids],
            "logprob": _floats(exp.logprobs[i, :n]),
            "ref_logprob": _floats(_row(exp.ref_logprobs, i, n)),
            "kl": (None if exp.ref_logprobs is None
                   else _floats(exp.logprobs[i, :n] - exp.ref_logprobs[i, :n])),
            "value": _floats(_row(exp.values, i, n)),
            "advantage": _floats(exp.advantages[i, :n]),
            "reward_t": _floats(exp.rewards[i, :n]),
            "entropy": _floats(_row(exp.entropy, i, n)),
        }
        if exp.reward_parts:
            row["rewards"] = exp.reward_parts[i]  # each reward source's score
        for key, value in (extra or {}).items():
            row[key] = value[i] if isinstance(value, (list, tuple)) else value
        rows.append(row)
    return rows


def log_rollouts(run_dir: str | Path, iteration: int, exp, tokenizer, extra: dict | None = None) -> Path:
    """Write rollouts/iter_XXXXX.jsonl for one iteration's experience (one Experience or a list
    of them, e.g. --generation-batches > 1). Atomic: a crash never leaves half a file, and an
    iteration redone after a resume replaces its file."""
    exps = exp if isinstance(exp, (list, tuple)) else [exp]
    rows, start = [], 0
    for e in exps:
        rows += rollout_rows(iteration, e, tokenizer, extra, start)
        start += e.batch_size
    folder = Path(run_dir) / "rollouts"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"iter_{iteration:05d}.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def read_rollouts(run_dir: str | Path) -> dict[int, list[dict]]:
    """{iteration: rows} of a run's rollout log (empty when it has none)."""
    out = {}
    for path in sorted((Path(run_dir) / "rollouts").glob("iter_*.jsonl")):
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if rows:
            out[int(path.stem.split("_")[1])] = rows
    return out
