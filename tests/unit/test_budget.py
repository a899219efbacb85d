"""The time budget's arithmetic: durations, padded token counts, decode-time interpolation."""

from __future__ import annotations

import subprocess
import sys

import pytest

from chatrl.budget import Rates, decode_time, fmt_duration, padded_tokens, parse_duration
from chatrl.errors import ConfigError


def test_parse_duration():
    assert parse_duration("15m") == 900 and parse_duration("900") == 900 and parse_duration(900) == 900
    assert parse_duration("1h30m") == 5400 and parse_duration("90s") == 90
    assert parse_duration("1.5h") == 5400 and parse_duration("2m 30s") == 150
    for off in (None, "", "0", "off", 0):
        assert parse_duration(off) is None
    for bad in ("15 minutes", "m15", "15x", "-5m"):
        with pytest.raises(ConfigError, match="is not a duration"):
            parse_duration(bad)
    assert fmt_duration(59.6) == "1m00s" and fmt_duration(905) == "15m05s" and fmt_duration(42) == "42s"


def test_padded_tokens_pads_each_batch_to_its_longest_row():
    assert padded_tokens([5, 5, 5, 5], 2) == 20
    assert padded_tokens([1, 9], 2) == 18  # one batch, padded to 9
    assert padded_tokens([3] * 10, 4) == 24  # 2 full batches; the rest is dropped, as the steps do
    assert padded_tokens([3] * 8, 4, epochs=3) == 72
    assert padded_tokens([3] * 8, 4, epochs=3, max_batches=5) == 60
    lengths = list(range(1, 65))
    assert sum(lengths) < padded_tokens(lengths, 8) <= 64 * 64


def test_decode_time_interpolates_between_measured_batches():
    r = Rates("fp32", 1e9, 1e9, 1e-9, decode_s={4: 0.1, 32: 0.3})
    assert decode_time(r, 4) == pytest.approx(0.1) and decode_time(r, 32) == pytest.approx(0.3)
    assert decode_time(r, 18) == pytest.approx(0.2)
    assert decode_time(r, 2) == pytest.approx(0.1)  # below the smallest: no faster than it
    assert decode_time(r, 64) == pytest.approx(0.6)  # above the largest: linear in the batch


def test_rollouts_decode_at_their_own_rate_where_measured():
    r = Rates("fp32", 1e9, 1e9, 1e-9, decode_s={16: 0.2, 48: 0.4}, rollout_decode_s={16: 0.15})
    assert decode_time(r, 16, rollout=True) == pytest.approx(0.15)
    assert decode_time(r, 16) == pytest.approx(0.2) and decode_time(r, 48, rollout=True) == pytest.approx(0.45)
    assert decode_time(Rates("fp32", 1e9, 1e9, 1e-9, decode_s={16: 0.2}), 16, rollout=True) == pytest.approx(0.2)


def test_the_probe_times_fp16_rollout_weights_only_where_step_3_uses_them():
    """--rollout-weights fp16: the probe also times a decode step through fp16 copies of the
    layers frozen below the trained top blocks; not for `same`, nor when every layer trains."""
    import torch

    from chatrl.budget import probe
    from chatrl.engine.rollout_weights import fp16_kernel_available
    from chatrl.models import resolve_model_path

    if torch.cuda.is_available() or not fp16_kernel_available():
        pytest.skip("fp16 rollout weights are for x86 CPUs (fbgemm)")
    path = resolve_model_path("tiny-llama")
    r = probe(path, "fp32", (2,), seq=16, layers_unfrozen=1, rollout_weights=("fp16", 3, 1))
    assert set(r.decode_s) == {2} and set(r.rollout_decode_s) == {3} and r.rollout_decode_s[3] > 0
    for other in (("same", 3, 1), ("fp16", 3, -1)):
        assert probe(path, "fp32", (2,), seq=16, layers_unfrozen=1, rollout_weights=other).rollout_decode_s == {}
    assert probe(path, "bf16", (2,), seq=16, layers_unfrozen=1, rollout_weights=("fp16", 3, 1)).rollout_decode_s == {}


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_the_probe_times_the_reports_decode_in_fp32_whatever_the_runs_precision(monkeypatch, dtype):
    """The report generates in fp32 (chatrl.evaluate.generate_answers) even in a bf16 run, so the
    probe times its batch's decode step in fp32, the rollout's in the run's precision, and the
    report's estimate uses the former."""
    import torch

    import chatrl.engine.hybrid as hybrid
    from chatrl.budget import probe
    from chatrl.models import resolve_model_path

    seen, real = [], hybrid.hf_generate

    def spy(model, prompt, *a, **kw):
        seen.append((prompt.shape[0], next(model.parameters()).dtype))
        return real(model, prompt, *a, **kw)

    monkeypatch.setattr(hybrid, "hf_generate", spy)
    r = probe(resolve_model_path("tiny-llama"), dtype, (2,), seq=16, layers_unfrozen=1, report_batch=3)
    run = torch.bfloat16 if dtype == "bf16" else torch.float32
    assert {d for b, d in seen if b == 2} == {run} and {d for b, d in seen if b == 3} == {torch.float32}
    assert set(r.decode_s) == {2} and set(r.report_decode_s) == {3} and 3 in r.multinomial_s


def test_one_stalled_timing_does_not_make_the_reports_decode_estimate(monkeypatch):
    """The report's estimate rests on one decode step timed at its batch: a stall in one of
    its timings (another process, the page cache) once put the report at 2:24 for 1:45 taken, and
    step 3 lost the difference. The probe times that step twice and keeps the faster."""
    import time

    import chatrl.engine.hybrid as hybrid
    from chatrl.budget import probe
    from chatrl.models import resolve_model_path

    real, stalls = hybrid.hf_generate, []

    def stall_once(model, prompt, mask, params, *a, **kw):
        if prompt.shape[0] == 3 and params.max_new_tokens == 10 and not stalls:
            stalls.append(1)
            time.sleep(0.8)  # 0.1 s per decode step of the 8 it is divided into
        return real(model, prompt, mask, params, *a, **kw)

    monkeypatch.setattr(hybrid, "hf_generate", stall_once)
    r = probe(resolve_model_path("tiny-llama"), "fp32", (2,), seq=16, layers_unfrozen=1, report_batch=3)
    assert stalls and r.report_decode_s[3] < 0.05, r.report_decode_s


def test_the_probe_times_llamacpp_rollouts_and_their_weight_conversion_where_they_apply():
    """--generation-backend llamacpp: the probe times a decode step through llama.cpp at the
    rollout batch and one rollout's conversion of the weights (the trained blocks'); an actor
    llama.cpp cannot take (GPT-2) is probed as Transformers will run it."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from chatrl.budget import probe
    from chatrl.models import resolve_model_path

    r = probe(resolve_model_path("tiny-llama"), "fp32", (2,), seq=16, layers_unfrozen=1,
              rollout_weights=("q8_0", 3, 1), generation_backend="llamacpp")
    assert r.rollout_backend == "llamacpp" and set(r.rollout_decode_s) == {3}
    assert r.rollout_decode_s[3] > 0 and r.rollout_sync_s > 0
    r = probe(resolve_model_path("tiny-gpt2"), "fp32", (2,), seq=16, layers_unfrozen=1,
              rollout_weights=("same", 3, 1), generation_backend="llamacpp")
    assert r.rollout_backend == "hf" and r.rollout_decode_s == {} and r.rollout_sync_s == 0


def test_the_report_estimate_counts_each_batch_prefill_and_the_samplers_draws(tmp_path):
    """The report's three models each prefill their held-out prompts (batches of up to 48, padded
    to their longest, as rendered for the model) and draw every decode step through Transformers'
    sampler (torch.multinomial): both are in the estimate, beside the decode steps."""
    from chatrl.budget import REPORT_DECODE_BATCH, STEP_OVERHEAD_S, Planner
    from chatrl.engine.flops import forward_flops, matmul_params
    from chatrl.models import load_causal_lm
    from chatrl.pipeline import build_parser, plan_steps

    plans = plan_steps(build_parser().parse_args(["--actor-model", "tiny", "--output-dir", str(tmp_path)]))
    r = Rates("fp32", 1e9, 1e9, 1e-9, decode_s={REPORT_DECODE_BATCH: 0.01})
    pl = Planner(plans, r)
    lengths = pl._report_prompt_lengths(96)
    assert len(lengths) == 96 and min(lengths) > 3  # a chat template around each question
    n = matmul_params(load_causal_lm(str(pl._model("sft"))))
    prefill = sum(len(b) * max(b) for b in (lengths[:48], lengths[48:])) * forward_flops(n, 1) / 1e9
    decode = 2 * 48 * 0.01
    assert pl.report(96) == pytest.approx(3 * (prefill + decode) + STEP_OVERHEAD_S["report"])
    r.multinomial_s = {REPORT_DECODE_BATCH: 0.005}
    assert pl.report(96) == pytest.approx(3 * (prefill + decode + 2 * 48 * 0.005) + STEP_OVERHEAD_S["report"])
    # the report's decode as the probe timed it in fp32, where the run's precision differs
    r.report_decode_s = {REPORT_DECODE_BATCH: 0.03}
    assert pl.report(96) == pytest.approx(3 * (prefill + 3 * decode + 2 * 48 * 0.005) + STEP_OVERHEAD_S["report"])
    assert pl.report(96, models=2) == pytest.approx(2 * (prefill + 3 * decode + 2 * 48 * 0.005)
                                                    + STEP_OVERHEAD_S["report"])


def _ppo_cfg(tmp_path, lr=5e-5):
    from chatrl.config import PPOConfig

    return PPOConfig(output_dir=str(tmp_path / "ppo"), actor_learning_rate=lr, max_steps=26, resume=True)


def _estimate(per_iteration=20.0):
    """A plan_train result: the report takes 60 s with the base model's answers, 40 s without."""
    return {"steps": {"sft": 60.0, "rm": 60.0}, "report": 60.0, "per_iteration": per_iteration,
            "configured": 26, "report_all": 60.0, "report_two": 40.0, "report_full": 60.0,
            "report_base": True}


@pytest.mark.parametrize("lr_max, fit, factor", [
    (2.0, 26, 1.0),                  # everything fits: the preset's rate
    (2.0, 12, (26 / 12) ** 0.5),     # 12 of 26 fit: x sqrt(26/12)
    (2.0, 3, 2.0),                   # 3 fit: sqrt(26/3) = 2.9, capped at 2
    (1.0, 3, 1.0),                   # --budget-lr-scale 1: off
])
def test_fewer_iterations_than_configured_raise_the_actors_learning_rate(tmp_path, capsys, lr_max,
                                                                         fit, factor):
    from chatrl.budget import STEP_OVERHEAD_S
    from chatrl.pipeline import _fit_ppo

    timings = {"sft": 60.0, "rm": 60.0}  # as estimated: no rescaling
    # what is left after the report (60 s) and step 3's start-up holds `fit` iterations of 20 s
    elapsed = 900 - 60 - STEP_OVERHEAD_S["ppo"] - 20 * fit - 5
    cfg, _ = _fit_ppo(_ppo_cfg(tmp_path), _estimate(), timings, 900.0, elapsed, lr_scale_max=lr_max,
                      report_base="on")
    err = capsys.readouterr().err
    assert f"~{fit} iterations fit" in err, err
    assert cfg.max_steps == 26 and cfg.actor_learning_rate == pytest.approx(5e-5 * factor)
    assert ("actor learning rate 5e-05 ->" in err) == (factor > 1.0), err
    assert ("capped at 2" in err) == (fit == 3 and lr_max == 2.0), err


def test_a_resumed_step_3_keeps_the_learning_rate_it_was_planned_with(tmp_path):
    """An interrupted step 3 resumes with the rate in its saved run config, whatever now fits."""
    import yaml

    from chatrl.pipeline import _fit_ppo

    cfg = _ppo_cfg(tmp_path)
    (tmp_path / "ppo" / "checkpoints").mkdir(parents=True)
    (tmp_path / "ppo" / "run_config.yaml").write_text(yaml.safe_dump({"max_steps": 26,
                                                                      "actor_learning_rate": 7.5e-5}))
    out, _ = _fit_ppo(cfg, _estimate(), {"sft": 60.0, "rm": 60.0}, 900.0, 600.0, lr_scale_max=2.0)
    assert out.actor_learning_rate == pytest.approx(7.5e-5) and out.max_steps == 26


@pytest.mark.parametrize("value", ["0.5", "x", "-1"])
def test_budget_lr_scale_rejects_what_is_not_a_factor_of_at_least_1(value):
    from chatrl.pipeline import budget_lr_scale, build_parser

    args = build_parser("chatrl train").parse_args(["--budget-lr-scale", value])
    with pytest.raises(ConfigError, match="budget_lr_scale .* is not a number >= 1"):
        budget_lr_scale(args)
    assert budget_lr_scale(build_parser("chatrl train").parse_args([])) == 2.0  # cpu-default's
    assert budget_lr_scale(build_parser("chatrl train").parse_args(["--preset", "smoke"])) == 1.0


@pytest.mark.parametrize("per_iteration", [20.0, 37.0])
def test_the_budget_suggested_for_every_iteration_is_the_least_whole_minute_whose_limit_holds_them(
        tmp_path, per_iteration):
    """Where fewer PPO iterations fit than configured, the estimate names the budget (in whole
    minutes) under which step 3's time limit holds all of them, at the estimated rates."""
    from chatrl.budget import STEP_OVERHEAD_S, budget_for_all
    from chatrl.pipeline import _fit_ppo

    probe = 30.0
    plan = _estimate(per_iteration)
    budget = budget_for_all(plan, probe)
    assert budget % 60 == 0

    def limit(b):  # steps 1-2 as estimated, after the probe
        return _fit_ppo(_ppo_cfg(tmp_path), plan, {"sft": 60.0, "rm": 60.0}, b, probe + 120.0,
                        report_base="on")[0].time_limit

    needed = STEP_OVERHEAD_S["ppo"] + 26 * per_iteration
    assert limit(budget) >= needed > limit(budget - 60)


@pytest.mark.parametrize("mode, per, left, with_base, fit", [
    ("auto", 20, 60 + 25 + 26 * 20, True, 26),   # every iteration fits with the base model's answers
    ("auto", 20, 60 + 25 + 12 * 20, False, 13),  # 12 fit with them, 13 without: leave them out
    ("auto", 37, 60 + 25 + 10 * 37, True, 10),   # 10 fit without them too (20 s < 37): nothing to gain
    ("on", 20, 60 + 25 + 12 * 20, True, 12),
    ("off", 20, 60 + 25 + 26 * 20, False, 26),
])
def test_the_report_leaves_the_base_model_out_only_where_that_buys_ppo_iterations(
        tmp_path, capsys, mode, per, left, with_base, fit):
    """--report-base auto: when step 3 starts, the base model's answers (a third of the report)
    are left out only where the budget cannot hold every PPO iteration with them and leaving them
    out makes room for at least one more; on / off decide by themselves."""
    from chatrl.pipeline import _fit_ppo

    cfg, base = _fit_ppo(_ppo_cfg(tmp_path), _estimate(per), {"sft": 60.0, "rm": 60.0}, 900.0, 900.0 - left,
                         report_base=mode)
    err = capsys.readouterr().err
    assert base == with_base and f"~{fit} iterations fit" in err, err
    assert ("the base model's are left out" in err) == (mode == "auto" and not with_base), err
    report = 60.0 if with_base else 40.0
    assert cfg.time_limit == pytest.approx(left - report - 10.0 - 0.07 * 900)


@pytest.mark.parametrize("mode, planned, left, with_base", [
    ("auto", False, 0.07 * 900 + 1.5 * 60 + 1, True),   # step 3 left room for the whole report
    ("auto", False, 0.07 * 900 + 1.5 * 60 - 1, False),  # it did not
    ("off", False, 900.0, False),
    ("auto", True, 10.0, True),                          # kept when step 3 started: kept
])
def test_the_base_model_answers_after_all_where_step_3_left_the_time(mode, planned, left, with_base):
    """--report-base auto: the base model's answers, left out when step 3 started, come back when
    step 3 ends early enough for the whole report (its estimate scaled as steps 1-2 ran: x1.5
    here), the reserve kept. A bf16 run whose steps 1-2 ran 1.5x their estimates left them out,
    then ran all 26 iterations and ended 175 s inside the budget."""
    from chatrl.pipeline import _report_base_after_ppo

    timings = {"sft": 90.0, "rm": 90.0}  # 1.5x the estimates
    assert _report_base_after_ppo(planned, mode, _estimate(), timings, 900.0, 900.0 - left) == with_base
    assert _report_base_after_ppo(False, "auto", None, timings, 900.0, 0.0) is False  # no estimate


def test_the_estimate_plans_step_3_with_the_report_it_will_write(tmp_path):
    """plan_train, through the real Planner (tiny model, given rates): a budget that holds every
    PPO iteration keeps the base model's answers; one a few iterations short plans the report
    without them, says so, and gives step 3 the seconds; the budget it names for every iteration
    is one whose report has the base model again."""
    from chatrl.budget import STEP_OVERHEAD_S, budget_for_all, plan_train
    from chatrl.pipeline import build_parser, plan_steps

    plans = plan_steps(build_parser().parse_args(["--actor-model", "tiny", "--output-dir", str(tmp_path)]))
    rates = Rates("fp32", 1e9, 1e9, 1e-9, decode_s={16: 0.01, 48: 0.5})  # a slow report
    free = plan_train(plans, rates, ["sft", "rm", "ppo"], 96, None)
    assert free["report_base"] and free["report"] == free["report_all"] > free["report_two"]
    per, n = free["per_iteration"], free["configured"]
    before = sum(free["steps"][k] for k in ("sft", "rm")) + STEP_OVERHEAD_S["ppo"]
    plenty = plan_train(plans, rates, ["sft", "rm", "ppo"], 96, before + free["report_all"] + n * per + 1)
    assert plenty["report_base"] and plenty["ppo_iters"] == n and "left out" not in plenty["text"]
    # iterations short with the base model's answers, more than leaving them out wins back
    gain = int((free["report_all"] - free["report_two"]) // per)
    assert gain >= 1
    budget = before + free["report_all"] + (n - gain - 2) * per + 1
    short = plan_train(plans, rates, ["sft", "rm", "ppo"], 96, budget)
    assert not short["report_base"] and short["report"] == short["report_two"]
    assert short["ppo_iters"] == n - 2
    assert "the base model's left out to give step 3 the time" in short["text"], short["text"]
    assert short["report_full"] == free["report_all"]
    kept = plan_train(plans, rates, ["sft", "rm", "ppo"], 96, budget, report_base="on")
    assert kept["report_base"] and kept["ppo_iters"] == n - gain - 2
    assert budget_for_all(short) == budget_for_all(kept)


def test_a_budget_cut_step_3_is_estimated_at_the_time_limit_it_will_get(tmp_path):
    """plan_train, through the real Planner: where the budget cuts step 3, its estimate is the
    time limit _fit_ppo gives it when the start-up, probe and steps 1-2 take what the plan says
    (the save and the reserve kept back), since step 3 stops there. The plan used to fill the
    whole budget: on a 2-core AVX2-only EPYC it printed 14:28 where the steps took 11:40."""
    from chatrl.budget import plan_train
    from chatrl.pipeline import _fit_ppo, build_parser, plan_steps

    plans = plan_steps(build_parser().parse_args(["--actor-model", "tiny", "--output-dir", str(tmp_path)]))
    rates = Rates("fp32", 1e9, 1e9, 1e-9, decode_s={16: 0.01, 48: 0.5})
    free = plan_train(plans, rates, ["sft", "rm", "ppo"], 96, None)
    per, n = free["per_iteration"], free["configured"]
    elapsed, steps12 = 30.0, sum(free["steps"][k] for k in ("sft", "rm"))
    budget = elapsed + steps12 + free["report_all"] + n * per * 3 / 4
    plan = plan_train(plans, rates, ["sft", "rm", "ppo"], 96, budget, report_base="on", elapsed=elapsed)
    assert 1 < plan["ppo_shown"] <= plan["ppo_iters"] < n and "to its time limit" in plan["text"], plan["text"]
    assert f"PPO planned at {plan['ppo_shown']} of its {n}" in plan["text"], plan["text"]
    timings = {k: plan["steps"][k] for k in ("sft", "rm")}
    cfg, _ = _fit_ppo(plans["ppo"], plan, timings, budget, elapsed + steps12, report_base="on")
    assert plan["steps"]["ppo"] == pytest.approx(cfg.time_limit)
    total = elapsed + sum(plan["steps"].values()) + plan["report"]
    assert total < budget * 0.95  # the old plan's: the budget, less part of an iteration
    # a budget that holds every iteration with the reserve to spare: estimated as it runs
    roomy = plan_train(plans, rates, ["sft", "rm", "ppo"], 96, 3 * budget, report_base="on", elapsed=elapsed)
    assert roomy["steps"]["ppo"] == pytest.approx(free["steps"]["ppo"]) and "time limit" not in roomy["text"]


def test_the_time_budget_counts_from_the_process_start_not_from_the_first_step():
    """`chatrl train` run as a command: its budget clock starts when the process did, so
    start-up and imports count (66 s of them once, with a cold page cache)."""
    code = ("import time; time.sleep(1.5); from chatrl.cli import process_start; "
            "print(time.time() - process_start())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout) >= 1.5


def test_the_time_budget_does_not_count_what_a_shell_ran_before_it_execd_python():
    """`bash -c 'pip install ... && chatrl train'` (the README's first command): bash may exec the
    last command in its own process, whose creation time is then the shell's, before the
    installs. The fresh-venv run of the README counted its 2 minutes of installs against the
    budget that way (finished in 792 s by its clock, 794 s with the installs). A process older
    than chatrl's import by more than a Python start-up counts from the import instead."""
    code = ("import chatrl.cli as c, time; c.STARTUP_MAX_S = 1.0; print(time.time() - c.process_start())")
    out = subprocess.run(["bash", "-c", f"sleep 2.5; exec {sys.executable} -c '{code}'"],
                         capture_output=True, text=True, check=True)
    assert float(out.stdout) < 2.0, out.stdout


def test_the_command_line_passes_its_process_start_and_a_python_caller_its_call(monkeypatch):
    """The command (argv from the command line) hands train_main its process's start; a Python
    caller in a long-lived process (a notebook, the tests) counts from its call."""
    import time

    import chatrl.cli as cli
    import chatrl.pipeline as pipeline

    seen = []
    monkeypatch.setattr(pipeline, "train_main", lambda argv, started=None: seen.append(started) or 0)
    assert cli.main(["train", "--estimate-only"]) == 0
    monkeypatch.setattr(sys, "argv", ["chatrl", "train", "--estimate-only"])
    assert cli.main() == 0
    assert seen[0] is None and seen[1] == pytest.approx(cli.process_start()) and seen[1] < time.time()


def test_the_ppo_iteration_estimate_follows_the_steps_algorithm(tmp_path):
    """The iteration the budget plans is the one step 3 runs: a critic-free estimator
    (REINFORCE++, RLOO) trains and scores no critic, and G answers per prompt decode G times the
    rows (the scoring and training passes forward each distinct prompt once)."""
    from chatrl.budget import Planner
    from chatrl.pipeline import build_parser, plan_steps

    def per_iteration(*overrides):
        plans = plan_steps(build_parser().parse_args(
            ["--actor-model", "tiny", "--output-dir", str(tmp_path), *overrides]))
        rates = Rates("fp32", 1e9, 1e9, 1e-9, decode_s={4: 0.01, 16: 0.02, 64: 0.05})
        return Planner(plans, rates).ppo_iteration()[0]

    batch = ["ppo.per_device_generation_batch_size=16", "ppo.per_device_training_batch_size=16"]
    ppo = per_iteration(*batch)
    no_critic = per_iteration(*batch, "ppo.advantage_estimator=reinforce_pp")
    assert no_critic < 0.8 * ppo
    groups = ["ppo.advantage_estimator=rloo", "ppo.num_generations=4"]
    assert per_iteration(*batch, *groups) > 3 * no_critic  # 64 answers to 16 prompts
    # the same 16 answers as 4 prompts x 4: no critic, and each prompt forwarded once in training
    same_rows = per_iteration("ppo.per_device_generation_batch_size=4", "ppo.per_device_training_batch_size=16",
                              *groups)
    assert same_rows < no_critic


def test_the_probe_times_the_rollouts_decode_at_every_answer_row(tmp_path, monkeypatch):
    """G answers to each prompt decode prompts x G rows at once: the probe times that batch, not
    the prompts alone (4 prompts x 4 answers were once timed at 4 rows and estimated at 4x the
    time a 16-row decode step takes)."""
    from chatrl import budget as B
    from chatrl.pipeline import train_main

    seen = {}

    def probe(path, dtype, decode_batches, **kw):
        seen.update(decode=decode_batches, rollout=kw["rollout_weights"][1])
        raise RuntimeError("probe stopped by the test")

    monkeypatch.setattr(B, "probe", probe)
    assert train_main(["--actor-model", "tiny", "--output-dir", str(tmp_path), "--estimate-only",
                       "ppo.advantage_estimator=rloo", "ppo.num_generations=4",
                       "ppo.per_device_generation_batch_size=2",
                       "ppo.per_device_training_batch_size=8"]) == 0
    assert seen == {"decode": (8,), "rollout": 8}
