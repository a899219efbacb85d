"""`chatrl train` tells its time up front and fits a time budget; `chatrl ppo --time-limit`.

- The estimate (per step, from a measurement of this machine) is printed before step 1, and
  each step's time beside its estimate when it ends.
- `--time-budget 1` (far too short for the smoke preset's 4 PPO iterations): the estimate plans
  1 iteration and says so; step 3 gets its configured 4 with the budget's time limit (recorded in
  run_config.yaml), and the limit stops it after iteration 1. With `--budget-lr-scale 3` the
  actor's learning rate is doubled (sqrt(4 / 1)) for the one iteration that fits.
- `--report-base off`: the report's answers come from the SFT and RLHF models only, and it says so.
- `chatrl ppo ... time_limit=0.01 max_steps=3`: stops after iteration 1, says why, and still
  saves a loadable actor.
"""

from __future__ import annotations

import json
import re

import pytest
import yaml

from ppo_helpers import chatrl, metrics

D = r"\d+(m\d\d)?s"  # a duration as printed: 45s, 1m05s


def test_estimate_budget_and_time_limit(tmp_path):
    out = tmp_path / "out"
    proc = chatrl("train", "--preset", "smoke", "--output-dir", out, "--time-budget", "1", "--report-prompts", "4",
                  "--report-base", "off", "--budget-lr-scale", "3", timeout=400, cwd=tmp_path)
    err = proc.stderr
    assert "estimated time ~" in err and "time budget 1s" in err, err[-3000:]
    for line in ("step 1 sft ~", "step 2 rm ~", "step 3 ppo ~"):
        assert line in err
    assert err.index("estimated time ~") < err.index("step sft ->")  # before step 1 starts
    assert re.search(r"PPO planned at 1 of its 4 iterations to fit \(all 4: --time-budget \d+m\)", err), err[-3000:]
    ppo = out / "step3-models" / "tiny"
    assert "~1 iterations fit in the" in err and "stopping after iteration 1 of 4" in err, err[-3000:]
    assert [r["step"] for r in metrics(ppo)] == [1]
    for step in ("sft", "rm", "ppo"):  # each step's time beside its estimate, then the whole run's
        assert re.search(rf"step {step} took {D}, estimated ~{D}", err), err[-3000:]
    assert re.search(rf"finished in \d+s; the steps and report took {D}, estimated ~{D}", err), err[-3000:]
    # --report-base off: the report's answers are the SFT and RLHF models' only, and it says so
    report = (out / "report.md").read_text()
    assert re.search(r"^\| RLHF \| [+-]\d\.\d{3} \|$", report, re.M) and "| base |" not in report, report
    assert "The base model (`" in report and "did not answer" in report and "--report-base on" in report
    assert "RLHF - SFT: " in report
    assert set(json.loads((out / "report.json").read_text())) == {"SFT", "RLHF"}
    saved = yaml.safe_load((ppo / "run_config.yaml").read_text())
    assert saved["max_steps"] == 4 and 0 < saved["time_limit"] < 1.0
    # 1 of 4 iterations fits: the actor's rate (the preset's 1e-4) x sqrt(4 / 1), under the cap of 3
    assert "actor learning rate 0.0001 -> 0.0002 (x2.00: sqrt(4/1) = 2.00;" in err, err[-3000:]
    assert saved["actor_learning_rate"] == pytest.approx(2e-4)

    # the limit inside step 3: 3 iterations asked, the first one already overruns 0.01 s
    out2 = tmp_path / "ppo2"
    proc = chatrl("ppo", "--preset", "smoke", "--actor-model-name-or-path", out / "actor-models/tiny/model",
                  "--critic-model-name-or-path", out / "reward-models/tiny/model", "--output-dir", out2,
                  "max_steps=3", "time_limit=0.01", timeout=300, cwd=tmp_path)
    assert "stopping after iteration 1 of 3" in proc.stderr, proc.stderr[-2000:]
    assert [r["step"] for r in metrics(out2)] == [1]
    assert (out2 / "actor" / "chatrl.json").exists()
