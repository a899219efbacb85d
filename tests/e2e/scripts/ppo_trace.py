"""`chatrl ARGS` with a trace of step 3, for tests/e2e/test_ppo_correctness.py.

    python ppo_trace.py ppo ...

$CHATRL_TEST_TRACE set: every PPOTrainer.train_rlhf call appends one JSON line to
"$CHATRL_TEST_TRACE.rank<R>.jsonl": the mini-batch's advantages, action mask and scores, the KL
coefficient this rank holds, and the trainer's stats (this rank's own values, before any
reduction across ranks).
$CHATRL_TEST_KILL_AFTER_CKPT=N: SIGKILL right after the checkpoint of iteration N was published
(nothing else of that iteration has run yet: what a crash there leaves behind).
"""

import json
import os
import signal
import sys

from chatrl.engine import checkpoint as ckpt
from chatrl.engine import ds
from chatrl.steps import ppo

trace = os.environ.get("CHATRL_TEST_TRACE")
kill_after = int(os.environ.get("CHATRL_TEST_KILL_AFTER_CKPT", "0"))

_train = ppo.PPOTrainer.train_rlhf


def train_rlhf(self, exp, loss_scale=1.0):
    out = _train(self, exp, loss_scale)
    row = {"rank": ds.rank(), "kl_coef": self.kl_ctl.value,
           "advantages": exp.advantages.tolist(), "action_mask": exp.action_mask.tolist(),
           "scores": exp.scores.tolist(),
           "stats": {k: v for k, v in self.last_stats.items() if isinstance(v, (int, float))}}
    with open(f"{trace}.rank{ds.rank()}.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    return out


if trace:
    ppo.PPOTrainer.train_rlhf = train_rlhf

_save = ckpt.save_checkpoint


def save_checkpoint(root, step, *args, **kw):
    out = _save(root, step, *args, **kw)
    if step == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
    return out


ckpt.save_checkpoint = save_checkpoint

if __name__ == "__main__":
    from chatrl.cli import main

    sys.exit(main(sys.argv[1:]))
