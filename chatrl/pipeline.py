"""`chatrl train`: steps 1, 2 and 3 in order, each feeding the next; resumable; then a report.

DeepSpeed-Chat's driver flags are accepted as they are (`--actor-model`, `--reward-model`,
`--num-gpus` / `--deployment-type`, `--actor-zero-stage`, `--reward-zero-stage`, `--output-dir`)
and the output layout is DeepSpeed-Chat's:

    output/actor-models/<actor>/model          step 1 (Hugging Face folder)
    output/reward-models/<reward>/model        step 2
    output/step3-models/<actor>/actor|critic   step 3 (and actor_ema/ with EMA)
    output/report.md, output/plots/*.png       the report

A step whose model folder exists is skipped; an interrupted step resumes from its last
checkpoint. With one device each step runs in this process; with more (or a hostfile) each step
runs under the DeepSpeed launcher with its resolved config file.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import config as C
from .engine.memory import release_freed_memory
from .errors import ChatRLError, ConfigError

STEP_NAMES = {1: "sft", 2: "rm", 3: "ppo"}


def build_parser(prog: str = "chatrl train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--step", nargs="+", type=int, default=[1, 2, 3], choices=(1, 2, 3),
                   help="steps to run (any subset of 1 2 3)")
    p.add_argument("--actor-model", "--actor_model", dest="actor_model", default=None,
                   help="actor base model (hub id, folder, .gguf; default: embedded SmolLM2-135M)")
    p.add_argument("--reward-model", "--reward_model", dest="reward_model", default=None,
                   help="reward/critic base model (default: the actor model)")
    p.add_argument("--actor-zero-stage", "--actor_zero_stage", dest="actor_zero_stage", type=int,
                   default=None, choices=(0, 1, 2, 3))
    p.add_argument("--reward-zero-stage", "--reward_zero_stage", dest="reward_zero_stage", type=int,
                   default=None, choices=(0, 1, 2, 3))
    p.add_argument("--output-dir", "--output_dir", dest="output_dir", default=C.OUTPUT_ROOT)
    p.add_argument("--deployment-type", "--deployment_type", dest="deployment_type", default=None,
                   choices=("single_gpu", "single_node", "multi_node"))
    p.add_argument("--num-gpus", "--num_gpus", dest="num_gpus", type=int, default=None,
                   help="devices: 1 runs in-process; more use the DeepSpeed launcher")
    p.add_argument("--hostfile", default=None, help="DeepSpeed hostfile for multi-node runs")
    p.add_argument("--data-path", "--data_path", dest="data_path", nargs="+", default=None,
                   help="datasets for all steps (default: the preset's, the demo task)")
    p.add_argument("--report-to", "--report_to", dest="report_to", default=None,
                   help="metrics trackers for every step: tensorboard,wandb,jsonl (default "
                        "tensorboard,jsonl; metrics.jsonl is always written)")
    p.add_argument("--no-report", dest="report", action="store_false", help="skip the final report")
    p.add_argument("--report-prompts", type=int, default=96,
                   help="held-out prompts in the report (96: the judge gain's standard error ~0.02)")
    p.add_argument("--report-base", "--report_base", dest="report_base", default="auto",
                   choices=("auto", "on", "off"),
                   help="the report's answers of the base model beside SFT and RLHF: auto (default) "
                        "leaves them out when the time budget cannot hold every PPO iteration with "
                        "them, giving step 3 that third of the report's time")
    p.add_argument("--restart", action="store_true", help="redo finished steps instead of skipping")
    p.add_argument("--time-budget", "--time_budget", dest="time_budget", default=None,
                   help="wall-clock budget for the whole run (e.g. 15m, 900, 1h; 'off'): step 3's "
                        "PPO iterations are planned to fit it from a short measurement of this "
                        "machine (default: the preset's; cpu-default: 15m)")
    p.add_argument("--budget-lr-scale", "--budget_lr_scale", dest="budget_lr_scale", default=None,
                   help="when the time budget fits fewer PPO iterations than configured, raise "
                        "the actor's learning rate by sqrt(configured / fitting), at most this "
                        "factor (default: the preset's; cpu-default: 2; 1: off)")
    p.add_argument("--no-estimate", dest="estimate", action="store_false",
                   help="skip the up-front time estimate (and so the time budget)")
    p.add_argument("--estimate-only", action="store_true",
                   help="print the time estimate (and the budget's PPO plan) and exit")
    p.add_argument("--algo", default="ppo", choices=("ppo", "grpo", "dr_grpo", "dapo", "rloo",
                                                     "reinforce_pp", "gspo"),
                   help="step 3's algorithm; any but ppo runs step 1 and then `chatrl grpo "
                        "--algo ALGO` from its model in place of steps 2-3 (default data: the "
                        "verifiable arithmetic task)")
    C.add_common_args(p)
    from .dschat.args import add_deepspeed_args

    add_deepspeed_args(p, config_flag=True)  # --deepspeed, --deepspeed_config FILE (every step)
    return p


def _launch_plan(args) -> list[str] | None:
    """None for in-process; else the DeepSpeed launcher's command prefix."""
    n, kind = args.num_gpus, args.deployment_type
    if kind is None and n is not None:
        kind = "single_gpu" if n <= 1 else ("single_node" if n <= 8 else "multi_node")
    if kind in (None, "single_gpu") and not args.hostfile:
        return None
    launcher = shutil.which("deepspeed") or os.path.join(os.path.dirname(sys.executable), "deepspeed")
    cmd = [launcher]
    if kind == "multi_node" or args.hostfile:
        hostfile = args.hostfile or "/job/hostfile"
        if not os.path.exists(hostfile):
            raise ConfigError(f"a multi-node run needs a DeepSpeed hostfile; {hostfile} does not "
                              "exist. Pass --hostfile FILE (lines like 'worker-1 slots=8')")
        cmd += ["--hostfile", hostfile]
    elif n is not None and n > 1:
        cmd += ["--num_gpus", str(n)]
    return cmd + ["--module", "chatrl"]


def _split_overrides(overrides: list[str]) -> dict[str, list[str]]:
    """`sft.learning_rate=1e-4` goes to step 1 only; `seed=3` to every step that has `seed`."""
    scoped: dict[str, list[str]] = {"sft": [], "rm": [], "ppo": [], "grpo": []}
    for o in overrides:
        key = o.split("=", 1)[0]
        if "." in key:
            step, rest = o.split(".", 1)
            if step not in scoped:
                raise ConfigError(f"override {o!r}: prefix {step!r} is not a step; use sft., rm., "
                                  "ppo. or grpo.")
            scoped[step].append(rest)
        else:
            name = key.replace("-", "_")
            hits = [s for s in scoped if name in C.STEP_CONFIGS[s].__dataclass_fields__]
            if not hits:
                raise ConfigError(f"override {o!r}: no step has an option {name!r}")
            for s in hits:
                scoped[s].append(o)
    return scoped


def _preset(args) -> str | None:
    named = args.actor_model is not None or bool(args.config)
    return args.preset or (None if named else "cpu-default")


def _train_setting(args, key: str, flag):
    """A `chatrl train` setting: its flag if given, else the `train: KEY` of the preset / config
    files (last wins), else None."""
    if flag is not None:
        return flag
    value = None
    preset = _preset(args)
    for path in ([C.preset_path(preset)] if preset else []) + list(args.config or []):
        value = C.load_yaml_parts(path, "train")[1].get(key, value)
    return value


def time_budget(args) -> float | None:
    """--time-budget, else the `train: time_budget` of the preset / config files (last wins)."""
    from .budget import parse_duration

    return parse_duration(_train_setting(args, "time_budget", args.time_budget))


def budget_lr_scale(args) -> float:
    """--budget-lr-scale, else the `train: budget_lr_scale` of the preset / config files; 1: off."""
    value = _train_setting(args, "budget_lr_scale", args.budget_lr_scale)
    try:
        value = float(1.0 if value is None else value)
    except (TypeError, ValueError):
        value = -1.0
    if not value >= 1.0:
        raise ConfigError(f"budget_lr_scale {value!r} is not a number >= 1 (1 turns it off); "
                          "write e.g. --budget-lr-scale 2")
    return value


def plan_steps(args) -> dict[str, object]:
    """The resolved config of each step (all three, so later steps know earlier outputs)."""
    root = args.output_dir
    preset = _preset(args)
    scoped = _split_overrides(args.overrides)

    def from_files(step: str):
        """The step's model as the preset / config files / overrides name it."""
        return C.build_config(C.STEP_CONFIGS[step], files=args.config, preset=preset,
                              overrides=scoped[step], section=step, validate=False).model_name_or_path

    actor = args.actor_model or from_files("sft")
    reward = args.reward_model or (from_files("rm") if not args.actor_model else None) or actor
    sft_dir = C.default_output_dir("sft", actor, root)
    rm_dir = C.default_output_dir("rm", reward, root)
    common = {"resume": True, **({"report_to": args.report_to} if args.report_to else {})}
    if args.data_path:
        common["data_path"] = args.data_path
    elif args.algo != "ppo":
        common["data_path"] = ["arith"]  # a task with a checkable answer
    if getattr(args, "deepspeed_config", None):
        common["deepspeed_config"] = args.deepspeed_config
    cli = {
        "sft": {**common, "model_name_or_path": actor, "output_dir": sft_dir,
                **({"zero_stage": args.actor_zero_stage} if args.actor_zero_stage is not None else {})},
        "rm": {**common, "model_name_or_path": reward, "output_dir": rm_dir,
               **({"zero_stage": args.reward_zero_stage} if args.reward_zero_stage is not None else {})},
        "ppo": {**common, "actor_model_name_or_path": str(Path(sft_dir) / "model"),
                "critic_model_name_or_path": str(Path(rm_dir) / "model"),
                "output_dir": C.default_output_dir("ppo", actor, root),
                **({"actor_zero_stage": args.actor_zero_stage} if args.actor_zero_stage is not None else {}),
                **({"critic_zero_stage": args.reward_zero_stage} if args.reward_zero_stage is not None else {})},
    }
    cli["grpo"] = {**common, "actor_model_name_or_path": str(Path(sft_dir) / "model"),
                   "algo": args.algo, "output_dir": C.default_output_dir("grpo", actor, root),
                   **({"actor_zero_stage": args.actor_zero_stage} if args.actor_zero_stage is not None
                      else {})}
    plans = {}
    for name in ("sft", "rm", "ppo") if args.algo == "ppo" else ("sft", "grpo"):
        values = {k: v for k, v in cli[name].items() if v is not None}
        plans[name] = C.build_config(C.STEP_CONFIGS[name], cli=values, files=args.config, preset=preset,
                                     overrides=scoped[name], section=name, validate=False)
        plans[name].validate()
    return plans


def step_done(name: str, cfg) -> Path | None:
    out = Path(cfg.output_dir) / ("actor" if name in ("ppo", "grpo") else "model")
    return out if (out / "chatrl.json").exists() else None


def _run_in_process(name: str, cfg) -> None:
    from .steps.ppo import run_ppo
    from .steps.reward import run_rm
    from .steps.sft import run_sft

    {"sft": run_sft, "rm": run_rm, "ppo": run_ppo, "grpo": run_ppo}[name](cfg)
    gc.collect()
    release_freed_memory()  # what the step freed, back to the system before the next step


def _run_launched(prefix: list[str], name: str, cfg) -> None:
    cfg_file = Path(cfg.output_dir) / "launch_config.yaml"
    cfg_file.parent.mkdir(parents=True, exist_ok=True)
    C.save_config(cfg, cfg_file)
    cmd = prefix + [name, "--config", str(cfg_file)]
    print(f"[chatrl train] launching: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    code = subprocess.call(cmd)
    if code != 0:
        raise SystemExit(f"chatrl train: step {name} failed under the DeepSpeed launcher (exit {code}); "
                         f"fix the error above and re-run the same command to resume")


def _estimate(args, plans: dict, to_run: list[str], budget: float | None, prefix, started: float):
    """Measure this machine, print the estimate (and the PPO plan of a budget, which counts from
    `started`); None when skipped (--no-estimate, nothing to run, or a launched multi-process run)."""
    from . import budget as B
    from .engine import ds

    steps = [n for n in to_run if n in ("sft", "rm", "ppo")]
    if not args.estimate or not steps or prefix is not None:
        if budget is not None and prefix is not None:
            print("[chatrl train] --time-budget is for single-process runs; ignored under the "
                  "DeepSpeed launcher", file=sys.stderr)
        return None
    from .models import resolve_model_path

    ppo = plans.get("ppo")
    report = args.report_prompts if args.report and ppo is not None else 0
    try:
        batches = (B.rollout_rows(ppo),) if ppo is not None else ()
        rollout = None if ppo is None else (ppo.rollout_weights, B.rollout_rows(ppo),
                                            ppo.actor_num_layers_unfrozen)
        rates = B.probe(resolve_model_path(plans["sft"].model_name_or_path),
                        ds.resolve_dtype(plans["sft"].dtype), batches or (1,), rollout_weights=rollout,
                        generation_backend="hf" if ppo is None else ppo.generation_backend,
                        report_batch=min(report, B.REPORT_DECODE_BATCH) if report else None)
        plan = B.plan_train(plans, rates, steps, report, budget,
                            planned_ppo=None if args.restart else _resumed_iters(ppo),
                            report_base=args.report_base, elapsed=time.time() - started)
    except (ChatRLError, OSError, RuntimeError, ValueError) as e:  # the steps will say it better
        print(f"[chatrl train] no time estimate ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
              "running without one" + (" and without the time budget" if budget else ""),
              file=sys.stderr, flush=True)
        return None
    print(f"[chatrl train] {plan['text']}", file=sys.stderr, flush=True)
    return plan


def _took(seconds: float, estimate: dict | None, step: str | None, ran: list[str] = ()) -> str:
    """'1m52s, estimated ~1m17s' for one step, or for the whole run (`step` None: the steps in
    `ran` and the report); without the estimate where there was none."""
    from .budget import fmt_duration

    out = fmt_duration(seconds)
    if estimate is None or (step is not None and step not in estimate["steps"]):
        return out
    est = estimate["steps"][step] if step is not None else \
        sum(estimate["steps"].get(n, 0.0) for n in ran) + (estimate["report"] or 0.0)
    return f"{out}, estimated ~{fmt_duration(est)}"


def _resumed_config(ppo_cfg) -> dict | None:
    """The saved run config of an interrupted step 3 that --resume will continue, else None."""
    if ppo_cfg is None or not ppo_cfg.resume:
        return None
    saved = Path(ppo_cfg.output_dir) / "run_config.yaml"
    if not (Path(ppo_cfg.output_dir) / "checkpoints").is_dir() or not saved.exists():
        return None
    import yaml

    return yaml.safe_load(saved.read_text()) or {}


def _planned_iters(saved: dict | None) -> int | None:
    """The iteration count in an interrupted step 3's saved run config (kept on resume)."""
    value = (saved or {}).get("max_steps")
    return int(value) if isinstance(value, int) and value > 0 else None


def _resumed_iters(ppo_cfg) -> int | None:
    """The iteration count an interrupted step 3 was planned with (kept on resume)."""
    return _planned_iters(_resumed_config(ppo_cfg))


def _estimate_scale(estimate: dict, timings: dict) -> float:
    """How long steps 1-2 took against their estimates (within 0.5-2x; 1 before any). Step 3 runs
    to its time limit, not to its estimate, so it does not count."""
    ran = [k for k in timings if k in estimate["steps"] and k != "ppo"]
    if not ran:
        return 1.0
    scale = sum(timings[k] for k in ran) / max(sum(estimate["steps"][k] for k in ran), 1e-9)
    return min(max(scale, 0.5), 2.0)


def _report_base_after_ppo(with_base: bool, mode: str, estimate: dict | None, timings: dict,
                           budget: float | None, elapsed: float) -> bool:
    """--report-base auto, after step 3: the base model's answers, left out when step 3 started,
    come back where the budget still holds the whole report (step 3 ended before its limit, e.g.
    every iteration ran on a machine faster than the steps before it suggested)."""
    from .budget import RESERVE

    if with_base or mode != "auto" or estimate is None or budget is None:
        return with_base
    return budget - elapsed - RESERVE * budget >= estimate["report_all"] * _estimate_scale(estimate, timings)


def _fit_ppo(cfg, estimate: dict, timings: dict, budget: float, elapsed: float,
             lr_scale_max: float = 1.0, report_base: str = "auto"):
    """Step 3's config with its iteration count and time limit for what is left of the budget,
    and whether the report answers with the base model too (budget.report_with_base). The
    estimates of an iteration and of the report are scaled by how far off the estimates of the
    steps just run were.

    lr_scale_max > 1: when fewer iterations fit than configured, the actor's learning rate is
    raised by sqrt(configured / fitting), at most lr_scale_max (kept from the saved run config
    when an interrupted step 3 resumes). The default run's step 3, from the same SFT and reward
    models (seed 1234) stopped after 9 iterations: judge gain +0.036 at the preset's 5e-5,
    +0.069 at 1e-4, +0.013 at 2e-4; run to all 26 (seed 4), 1e-4 gained less than 5e-5 (+0.057
    against +0.094). The schedule still spans the configured iterations."""
    from .budget import fit_iterations, fmt_duration, ppo_time_limit, report_with_base

    scale = _estimate_scale(estimate, timings)
    per_iter, configured = estimate["per_iteration"] * scale, estimate["configured"]
    with_base = report_with_base(report_base, budget - elapsed, per_iter, configured,
                                 estimate["report_all"] * scale, estimate["report_two"] * scale)
    report = estimate["report_all" if with_base else "report_two"] * scale
    room = budget - elapsed - report
    fit = fit_iterations(room, per_iter, configured)
    # The count that fits is an estimate; the time limit is what holds the budget. Step 3 runs
    # its configured count (or an interrupted run's) and stops after the last iteration that
    # fits, measured as it goes: on a machine faster than its probe the budget is still used.
    resumed = _resumed_config(cfg)
    n = _planned_iters(resumed) or estimate["configured"]
    print(f"[chatrl train] step ppo: ~{fit} iterations fit in the {fmt_duration(max(room, 0))} left of "
          f"the budget (estimates x{scale:.2f} after the steps so far); it stops at the time limit, "
          f"after at most {n}", file=sys.stderr, flush=True)
    if not with_base and report_base == "auto":
        print("[chatrl train] report: SFT and RLHF answers only; the base model's are left out to "
              "give step 3 the time (--report-base on keeps them)", file=sys.stderr, flush=True)
    if resumed is not None and isinstance(resumed.get("actor_learning_rate"), (int, float)):
        cfg = dataclasses.replace(cfg, actor_learning_rate=float(resumed["actor_learning_rate"]))
    elif lr_scale_max > 1.0 and fit < estimate["configured"]:
        raw = (estimate["configured"] / fit) ** 0.5
        factor = min(lr_scale_max, raw)
        lr = cfg.actor_learning_rate * factor
        capped = f", capped at {lr_scale_max:g}" if raw > lr_scale_max else ""
        print(f"[chatrl train] step ppo: actor learning rate {cfg.actor_learning_rate:g} -> {lr:.3g} "
              f"(x{factor:.2f}: sqrt({estimate['configured']}/{fit}) = {raw:.2f}{capped}; fewer "
              "iterations fit than configured; --budget-lr-scale 1 keeps it)",
              file=sys.stderr, flush=True)
        cfg = dataclasses.replace(cfg, actor_learning_rate=lr)
    return dataclasses.replace(cfg, max_steps=n, time_limit=max(ppo_time_limit(room, budget),
                                                                0.01)), with_base  # 0: no limit


def train_main(argv: list[str] | None = None, prog: str = "chatrl train",
               started: float | None = None) -> int:
    """`chatrl train`. started: when the command's process started (cli.process_start); the
    time budget counts from there, else from this call (a Python caller's long-lived process)."""
    args = build_parser(prog).parse_args(argv)
    plans = plan_steps(args)
    prefix = _launch_plan(args)
    wanted = [STEP_NAMES[s] for s in sorted(set(args.step))]
    if args.algo != "ppo":  # step 1, then online RL from its model in place of steps 2-3
        wanted = [n for n in wanted if n == "sft"] + (["grpo"] if {2, 3} & set(args.step) else [])
    t0 = time.time() if started is None else started
    to_run = [n for n in wanted if args.restart or not step_done(n, plans[n])]
    budget, lr_scale = time_budget(args), budget_lr_scale(args)
    if args.estimate_only:
        args.estimate = True
        to_run = wanted if args.restart or not to_run else to_run
    estimate = _estimate(args, plans, to_run, budget, prefix, t0)
    t_planned = time.time()
    if args.estimate_only:
        return 0
    # the report's base-model answers: kept unless --report-base off, or a budget short of time
    # drops them (auto; decided again when step 3 starts)
    with_base = args.report_base != "off" if estimate is None else estimate["report_base"]
    timings = {}
    for name in wanted:
        cfg = plans[name]
        done = step_done(name, cfg)
        if done and not args.restart:
            print(f"[chatrl train] step {name}: already finished ({done}); skipping", file=sys.stderr)
            continue
        if args.restart:
            cfg = dataclasses.replace(cfg, resume=False, overwrite=True)
        if name == "ppo" and estimate is not None and budget is not None:
            cfg, with_base = _fit_ppo(cfg, estimate, timings, budget, time.time() - t0, lr_scale,
                                      args.report_base)
        print(f"[chatrl train] step {name} -> {cfg.output_dir}", file=sys.stderr, flush=True)
        t = time.time()
        if prefix is None:
            _run_in_process(name, cfg)
        else:
            _run_launched(prefix, name, cfg)
        timings[name] = time.time() - t
        print(f"[chatrl train] step {name} took {_took(timings[name], estimate, name)}", file=sys.stderr,
              flush=True)
    last = "ppo" if "ppo" in plans else "grpo"
    actor = step_done(last, plans[last]) or step_done("sft", plans["sft"])
    if args.report and "ppo" in plans and step_done("ppo", plans["ppo"]):
        from .report import write_report

        base_before = with_base
        with_base = _report_base_after_ppo(with_base, args.report_base, estimate, timings, budget,
                                           time.time() - t0)
        if with_base and not base_before:
            print("[chatrl train] report: the base model's answers too (step 3 left the time)",
                  file=sys.stderr, flush=True)

        report = write_report(Path(args.output_dir), plans, timings, n_prompts=args.report_prompts,
                              with_base=with_base)
        print(f"[chatrl train] report: {report}", file=sys.stderr)
    done = f"[chatrl train] finished in {time.time() - t0:.0f}s"
    if estimate is not None:  # what the estimate covered: from its print to here
        done += f"; the steps and report took {_took(time.time() - t_planned, estimate, None, list(timings))}"
    print(done, file=sys.stderr)
    if actor:
        print(f"\nYour chat model: {actor}\nTalk to it:      chatrl chat --path {actor}\n"
              f"Serve it:        chatrl serve --path {actor}")
    return 0
