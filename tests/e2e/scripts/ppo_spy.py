"""`chatrl ARGS` with a spy on the PTX update, for tests/e2e/test_ppo.py.

    python ppo_spy.py ppo --unsupervised_dataset_name FILE ...

Every call of PPOTrainer.train_unsupervised appends one JSON line to $CHATRL_TEST_SPY:
{"shape", "labels", "coef", "loss", "ids"} (the batch as the actor saw it), so a test can check
that the PTX loss ran, on the file's text, once per PPO mini-batch, with --unsup_coef.
"""

import json
import math
import os
import sys

from chatrl.steps import ppo

_orig = ppo.PPOTrainer.train_unsupervised


def train_unsupervised(self, batch, unsup_coef):
    loss = _orig(self, batch, unsup_coef)
    row = {"shape": list(batch["input_ids"].shape), "labels": int((batch["labels"] != -100).sum()),
           "coef": unsup_coef, "loss": float(loss), "ids": batch["input_ids"].tolist(),
           "mask": batch["attention_mask"].tolist()}
    assert math.isfinite(row["loss"])
    with open(os.environ["CHATRL_TEST_SPY"], "a") as f:
        f.write(json.dumps(row) + "\n")
    return loss


ppo.PPOTrainer.train_unsupervised = train_unsupervised

if __name__ == "__main__":
    from chatrl.cli import main

    sys.exit(main(sys.argv[1:]))
