"""Step 3 (PPO) against a peer: TRL 1.12's experimental PPOTrainer and chatrl's PPO iteration on the
same workload, in one process on the same machine, so the speed ratio is measured, not assumed.

    pip install --no-deps --target benchmarks/.trl trl==1.12.0     # once; never into the venv
    python benchmarks/bench_trl_ppo.py                              # fp32 x 4 and fp32 x 16
    python benchmarks/bench_trl_ppo.py --quick                      # tiny model, 1 iteration (smoke check)

TRL is loaded from benchmarks/.trl only (put on sys.path by this script): the venv and the tests
never see it. TRL 1.12 is the last release with PPO; its other requirements (accelerate, datasets,
transformers, jinja2, packaging) come from the venv as they are.

The workload (both sides): B prompts of exactly --prompt-len tokens (bench_ppo.make_prompts, no
padding), answers of exactly --answer-len sampled tokens (temperature 1.0, no top-k/top-p), fp32,
one process, the same torch threads, no gradient checkpointing; policy and reference = the model
(two copies), critic and reward = the same checkpoint with a fresh one-output head; --ppo-epochs
(1) epochs over mini-batches of --train-batch (0: = B), one optimizer step per mini-batch.

  TRL:    PPOTrainer(policy=AutoModelForCausalLM, ref_model=AutoModelForCausalLM,
          reward_model / value_model=AutoModelForSequenceClassification(num_labels=1)); no stop
          token (so generation never ends early: exactly response_length tokens), one rollout batch
          of B, num_mini_batches = B / mini-batch; its own train() loop runs --iters + 1
          iterations; a trainer callback stamps the end of each one, the first is the warm-up.
  chatrl: bench_ppo.run_workload (imported, not copied): one untimed, then --iters timed ones.

Each side's iteration time covers everything its loop does between two iterations (see the
README section "bench_trl_ppo.py"), and samples/s = B / mean iteration seconds.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
import common as B  # noqa: E402  (offline / CPU environment before transformers is imported)
import bench_ppo as P  # noqa: E402

import torch  # noqa: E402

TRL_DIR = HERE / ".trl"
TRL_VERSION = "1.12.0"
INSTALL_HINT = f"pip install --no-deps --target {TRL_DIR.relative_to(B.REPO)} trl=={TRL_VERSION}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default="fp32:4,fp32:16",
                   help="comma-separated fp32:prompts workloads (fp32 only: TRL has no fp32-master bf16 "
                        "mode to match chatrl's)")
    p.add_argument("--iters", type=int, default=2, help="timed iterations per side and workload (after 1 warm-up)")
    p.add_argument("--quick", action="store_true", help="tiny model, 32-token prompts/answers, 1 iteration, 1 thread")
    p.add_argument("--model", default=None, help="model name or folder (default: embedded SmolLM2-135M)")
    p.add_argument("--sides", default="trl,chatrl", help="comma-separated: trl, chatrl")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--answer-len", type=int, default=64)
    p.add_argument("--ppo-epochs", type=int, default=1, help="PPO epochs over each batch (as bench_ppo)")
    p.add_argument("--train-batch", type=int, default=0, help="PPO mini-batch (0: = prompts, as bench_ppo)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--layers-unfrozen", type=int, default=-1,
                   help="train only the top N blocks of policy/actor and value model/critic on both "
                        "sides (TRL: the lower ones set requires_grad=False; chatrl: "
                        "--actor/critic-num-layers-unfrozen N, which also shares the frozen trunk)")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat each workload's pair of measurements; even rounds run chatrl first")
    p.add_argument("--rollout-weights", default="same", choices=("same", "fp16", "q8_0"),
                   help="chatrl's --rollout-weights (fp16: fbgemm fp16 copies for decode steps, or "
                        "fp16 weights in llama.cpp; q8_0: llama.cpp only)")
    p.add_argument("--generation-backend", default="hf", choices=("hf", "llamacpp"),
                   help="chatrl's --generation-backend (llamacpp: rollouts through llama.cpp)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/trl-ppo-<host>.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.model = args.model or "tiny"
        args.prompt_len, args.answer_len = min(args.prompt_len, 32), min(args.answer_len, 32)
        args.iters = 1
        args.threads = args.threads or 1
    if args.rounds < 1 or args.iters < 1:
        raise SystemExit("--rounds and --iters must be at least 1")
    args.sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if not args.sides or set(args.sides) - {"trl", "chatrl"}:
        raise SystemExit("--sides: trl and/or chatrl")
    args.workload_list = []
    for w in args.workloads.split(","):
        d, _, n = w.strip().partition(":")
        if d != "fp32" or not n.isdigit() or int(n) < 1:
            raise SystemExit(f"--workloads: {w!r} is not fp32:prompts (e.g. fp32:4)")
        args.workload_list.append((d, int(n)))
    return args


def import_trl():
    """TRL from benchmarks/.trl only; the version must be the one the issue names."""
    if not (TRL_DIR / "trl").is_dir():
        raise SystemExit(f"TRL is not installed for the benchmark; run: {INSTALL_HINT}")
    sys.path.insert(0, str(TRL_DIR))
    import trl

    if not Path(trl.__file__).resolve().is_relative_to(TRL_DIR.resolve()) or trl.__version__ != TRL_VERSION:
        raise SystemExit(f"expected trl {TRL_VERSION} from {TRL_DIR}, got {trl.__version__} from {trl.__file__}; "
                         f"run: {INSTALL_HINT}")
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo_module

    return trl, PPOConfig, PPOTrainer, trl_ppo_module


# ----------------------------------------------------------------------------- TRL side

class _Stamps:
    """Timestamps inside TRL's train loop, taken by wrapping the module-level helpers its loop calls
    by name (batch_generation, forward) and a trainer callback at each iteration's end. Behaviour is
    unchanged; the wrappers only read the clock and check the generated length."""

    def __init__(self, module, trainer, answer_len: int, pad_id: int, eos_id: int):
        self.module, self.trainer = module, trainer
        self.answer_len, self.pad_id, self.eos_id = answer_len, pad_id, eos_id
        self.iter_end: list[float] = []
        self.gen: list[tuple[float, float]] = []       # (start, end) of batch_generation, per iteration
        self.train_start: list[float] = []             # first training forward, per iteration
        self.checks: list[dict] = []
        self._orig = {"batch_generation": module.batch_generation, "forward": module.forward}
        stamps = self

        def batch_generation(model, queries, *a, **kw):
            t0 = time.perf_counter()
            out = stamps._orig["batch_generation"](model, queries, *a, **kw)
            B.sync()
            stamps.gen.append((t0, time.perf_counter()))
            resp = out[0][:, queries.shape[1]:]
            stamps.checks.append({"answer_len": int(resp.shape[1]), "pad_tokens": int((resp == pad_id).sum()),
                                  "eos_tokens": int((resp == eos_id).sum())})
            return out

        def forward(model, *a, **kw):
            if model is stamps.trainer.model and len(stamps.train_start) < len(stamps.gen):
                B.sync()
                stamps.train_start.append(time.perf_counter())
            return stamps._orig["forward"](model, *a, **kw)

        module.batch_generation, module.forward = batch_generation, forward

    def close(self):
        for k, v in self._orig.items():
            setattr(self.module, k, v)


def _iteration_callback(stamps: _Stamps):
    from transformers import TrainerCallback

    class IterationEnd(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            B.sync()
            stamps.iter_end.append(time.perf_counter())     # the start of the first iteration

        def on_step_end(self, args, state, control, **kw):
            B.sync()
            stamps.iter_end.append(time.perf_counter())

    return IterationEnd()


def run_trl(args, trl_mods, path: str, tok, prompts: int, chatrl_cfg, peak: float) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from chatrl.engine.flops import matmul_params

    _, PPOConfig, PPOTrainer, module = trl_mods
    mb = args.train_batch or prompts
    if prompts % mb:
        raise SystemExit(f"--train-batch {mb} does not divide {prompts} prompts")
    n_iters = args.iters + 1
    torch.manual_seed(args.seed)
    with B.Timer() as t_build:
        policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        value = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
        reward = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
        for m in (value, reward):
            m.config.pad_token_id = tok.pad_token_id
        if args.layers_unfrozen >= 0:  # the same frozen layout as chatrl's (value head trains)
            from chatrl.models.freeze import freeze_lower_layers

            freeze_lower_layers(policy, args.layers_unfrozen)
            freeze_lower_layers(value, args.layers_unfrozen)
        ids, _ = P.make_prompts(tok, prompts, args.prompt_len, args.seed)
        data = Dataset.from_dict({"input_ids": ids.tolist()})
        out_dir = tempfile.mkdtemp(prefix="bench-trl-ppo-")
        cfg = PPOConfig(
            output_dir=out_dir, report_to="none", save_strategy="no", eval_strategy="no", disable_tqdm=True,
            seed=args.seed, bf16=False, fp16=False,
            # the non-distributed process state made in main() (see there), not a fresh one
            accelerator_config={"use_configured_state": True},
            gradient_checkpointing=False, dataloader_num_workers=0,
            # one rollout batch of B prompts per iteration, generated (and scored) in one batch
            per_device_train_batch_size=prompts, gradient_accumulation_steps=1,
            local_rollout_forward_batch_size=prompts, total_episodes=prompts * n_iters,
            # the same PPO update as chatrl's: epochs x (B / mini-batch) optimizer steps
            num_ppo_epochs=args.ppo_epochs, num_mini_batches=prompts // mb,
            # forced-length answers: no stop token, so nothing ends before response_length
            response_length=args.answer_len, stop_token=None, stop_token_id=None, missing_eos_penalty=None,
            num_sample_generations=0,
            # hyper-parameters taken from chatrl's config of the same workload (no effect on speed)
            temperature=chatrl_cfg.temperature, learning_rate=chatrl_cfg.actor_learning_rate,
            kl_coef=chatrl_cfg.kl_coef, cliprange=chatrl_cfg.cliprange,
            cliprange_value=chatrl_cfg.cliprange_value, gamma=chatrl_cfg.gamma, lam=chatrl_cfg.lam,
        )
        trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                             train_dataset=data, value_model=value)
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    stamps = _Stamps(module, trainer, args.answer_len, tok.pad_token_id, tok.eos_token_id)
    trainer.add_callback(_iteration_callback(stamps))
    n_steps = [0]                                   # optimizer steps, all iterations
    real_step = trainer.optimizer.step

    def counted_step(*a, **kw):
        n_steps[0] += 1
        return real_step(*a, **kw)

    object.__setattr__(trainer.optimizer, "step", counted_step)   # removed with the probe below
    probes = B.Probes()
    probes.method("backward_s", trainer.accelerator, "backward")
    probes.method("step_s", trainer.optimizer, "step")
    # TRL's loop calls gc.collect() twice per iteration (a walk over every Python object of the
    # process: ~450k with TRL alone, ~480k with chatrl loaded too); timed through a stand-in module
    timed_gc = types.ModuleType("gc")
    timed_gc.collect = gc.collect
    probes.method("gc_s", timed_gc, "collect")
    module.gc = timed_gc
    # per-iteration probe totals: read at each iteration end by a second callback
    per_iter_probes: list[dict] = []
    from transformers import TrainerCallback

    class TakeProbes(TrainerCallback):
        def on_step_end(self, *a, **kw):
            per_iter_probes.append(probes.take())

    trainer.add_callback(TakeProbes())
    setup = {"distributed_type": str(trainer.accelerator.distributed_type),
             "device": str(trainer.accelerator.device),
             "optimizer": type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__,
             "optimizer_defaults": {k: v for k, v in getattr(trainer.optimizer, "optimizer", trainer.optimizer)
                                    .defaults.items() if k in ("fused", "foreach", "lr", "betas")},
             "optim": str(cfg.optim), "gradient_checkpointing": trainer.model.policy.is_gradient_checkpointing,
             "total_iterations": cfg.num_total_batches, "mini_batch": cfg.local_mini_batch_size,
             "num_mini_batches": cfg.num_mini_batches, "ppo_epochs": cfg.num_ppo_epochs,
             "temperature": cfg.temperature}
    assert setup["total_iterations"] == n_iters, setup
    assert setup["distributed_type"].endswith("NO"), f"TRL's accelerator is distributed: {setup}"
    try:
        trainer.train()
    finally:
        stamps.close()
        probes.close()
        module.gc = gc
    assert len(stamps.iter_end) == n_iters + 1 and len(stamps.gen) == n_iters == len(stamps.train_start), \
        (len(stamps.iter_end), len(stamps.gen), len(stamps.train_start))
    assert n_steps[0] == n_iters * args.ppo_epochs * (prompts // mb), \
        f"TRL made {n_steps[0]} optimizer steps in {n_iters} iterations"
    bad = [c for c in stamps.checks if c["answer_len"] != args.answer_len]
    assert not bad, f"TRL's answers were not of the forced length: {stamps.checks}"
    Na, Nc = matmul_params(policy), matmul_params(value)
    T = prompts * (args.prompt_len + args.answer_len)
    rows = []
    for i in range(1, n_iters):                      # iteration 0 is the warm-up
        start, end = stamps.iter_end[i], stamps.iter_end[i + 1]
        g0, g1 = stamps.gen[i]
        tr = stamps.train_start[i]
        row = {"iteration_s": end - start, "generate_s": g1 - g0, "score_s": tr - g1, "train_s": end - tr,
               "backward_s": per_iter_probes[i].get("backward_s", 0.0),
               "step_s": per_iter_probes[i].get("step_s", 0.0), "gc_s": per_iter_probes[i].get("gc_s", 0.0),
               **stamps.checks[i]}
        row["other_s"] = row["iteration_s"] - row["generate_s"] - row["score_s"] - row["train_s"]
        rows.append(row)
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    f_gen, f_score, f_train = 2 * Na * T, (2 * Na + 4 * Nc) * T, args.ppo_epochs * 6 * (Na + Nc) * T
    if args.layers_unfrozen >= 0:  # what its autograd runs (chatrl.engine.flops)
        from chatrl.engine.flops import train_flops_per_token

        f_train = args.ppo_epochs * (train_flops_per_token(policy) + train_flops_per_token(value)) * T
    res = {"side": "trl", "prompts": prompts, "train_batch": mb, "ppo_epochs": args.ppo_epochs,
           "prompt_len": args.prompt_len, "answer_len": args.answer_len, "iterations": len(rows),
           "build_s": t_build.s, "setup": setup, "optimizer_steps_per_iteration": n_steps[0] // n_iters,
           "matmul_params_actor": Na, "matmul_params_critic": Nc,
           **{k: mean[k] for k in ("iteration_s", "generate_s", "score_s", "train_s", "other_s",
                                   "backward_s", "step_s", "gc_s")},
           "samples_per_s": prompts / mean["iteration_s"],
           "samples_per_s_best": max(prompts / r["iteration_s"] for r in rows),
           "flops_per_s": (f_gen + f_score + f_train) / mean["iteration_s"],
           "warmup_s": stamps.iter_end[1] - stamps.iter_end[0],
           "answer_checks": stamps.checks, "all_iterations": rows}
    res["pct_of_peak"] = 100 * res["flops_per_s"] / peak
    if any(c["pad_tokens"] for c in stamps.checks):
        print(f"    note: TRL sampled the pad token inside some answers ({stamps.checks}); TRL masks those "
              "positions (same compute, different masks)", flush=True)
    del trainer, policy, ref, value, reward
    shutil.rmtree(out_dir, ignore_errors=True)     # TRL's output_dir (nothing is saved in it)
    gc.collect()
    return res


# ----------------------------------------------------------------------------- chatrl side

def run_chatrl(args, path: str, tok, prompts: int, peaks: dict) -> dict:
    pargs = _bench_ppo_args(args)
    w = P.run_workload(pargs, path, tok, "fp32", prompts, peaks, "ppo", args.layers_unfrozen,
                       rollout_weights=args.rollout_weights, generation_backend=args.generation_backend)
    w["side"] = "chatrl"
    w["backward_s"] = w["breakdown_s"]["actor_backward_s"] + w["breakdown_s"]["critic_backward_s"]
    w["step_s"] = w["breakdown_s"]["actor_step_s"] + w["breakdown_s"]["critic_step_s"]
    w["gc_s"] = w["breakdown_s"]["gen_empty_cache_s"]   # chatrl's only gc/empty-cache point
    return w


def _bench_ppo_args(args):
    """bench_ppo's own argument defaults, with this run's workload settings."""
    argv = ["--iters", str(args.iters), "--prompt-len", str(args.prompt_len), "--answer-len", str(args.answer_len),
            "--ppo-epochs", str(args.ppo_epochs), "--train-batch", str(args.train_batch), "--seed", str(args.seed)]
    if args.model:
        argv += ["--model", args.model]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    return P.parse_args(argv)


def _over_rounds(results: list[dict]) -> dict:
    """One side's figures over the rounds: the mean of each per-iteration time; samples/s from the
    mean iteration time (one round: that round's result as it is)."""
    if len(results) == 1:
        return results[0]
    keys = ("iteration_s", "generate_s", "score_s", "train_s", "other_s", "backward_s", "step_s", "gc_s",
            "flops_per_s", "pct_of_peak")
    out = {k: sum(r[k] for r in results) / len(results) for k in keys}
    out["samples_per_s"] = results[0]["prompts"] / out["iteration_s"]
    out["samples_per_s_rounds"] = [r["samples_per_s"] for r in results]
    return out


# ----------------------------------------------------------------------------- report

PASSES = {
    "trl": "gen: HF generate (scores kept, log-probs from them); score: ref fwd, value fwd, reward fwd; "
           "train: per mini-batch policy+value fwd, one backward, one AdamW step over both; + entropy of the logits, "
           "metrics, 2 gc.collect per iteration",
    "chatrl": "gen: HybridEngine.generate (log-probs from its logits); score: ref fwd, critic fwd, reward fwd; "
              "train: per mini-batch actor fwd/bwd/step, critic fwd/bwd/step (two engines, grad clip 1.0)",
}


def _report(res: dict) -> None:
    rows, prow = [], []
    for w in res["workloads"]:
        t, c = w.get("trl"), w.get("chatrl")
        ratio = c["samples_per_s"] / t["samples_per_s"] if t and c else None
        w["ratio_chatrl_over_trl"] = ratio
        rows.append({"w": f"fp32 x {w['prompts']}",
                     "trl": f"{t['samples_per_s']:.3f}" if t else "-",
                     "chatrl": f"{c['samples_per_s']:.3f}" if c else "-",
                     "ratio": f"{ratio:.2f}x" if ratio else "-",
                     "rounds": ", ".join(f"{x:.2f}x" for x in w.get("round_ratios", [])) or "-",
                     "target": f">= {w['target']}x"})
        for side, r in (("trl", t), ("chatrl", c)):
            if r:
                prow.append({"w": f"fp32 x {w['prompts']}", "side": side, "it": f"{r['iteration_s']:.2f}",
                             "gen": f"{r['generate_s']:.2f}", "score": f"{r['score_s']:.2f}",
                             "train": f"{r['train_s']:.2f}", "bwd": f"{r['backward_s']:.2f}",
                             "step": f"{r['step_s']:.2f}", "gc": f"{r['gc_s']:.2f}",
                             "other": f"{r['other_s']:.2f}",
                             "fl": f"{B.fmt_flops(r['flops_per_s'])} ({r['pct_of_peak']:.1f}%)"})
    a = res["args"]
    top = a.get("layers_unfrozen", -1)
    frozen = f", top {top} blocks trained (the rest frozen on both sides)" if top >= 0 else ""
    print(f"\nPPO iteration{frozen}, {a['prompt_len']}-token prompts, {a['answer_len']}-token answers (forced), "
          f"{a['ppo_epochs']} PPO epoch(s), mini-batch = {a['train_batch'] or 'prompts'}, fp32, 1 process, "
          f"{res['threads']} threads, {a['iters']} timed iteration(s) after 1 warm-up, {a['rounds']} round(s) "
          "(times: mean over rounds):")
    print(B.table(rows, [("w", "workload"), ("trl", "TRL samples/s"), ("chatrl", "chatrl samples/s"),
                         ("ratio", "chatrl / TRL"), ("rounds", "per round"), ("target", "issue target")]))
    print("\nseconds per iteration:")
    print(B.table(prow, [("w", "workload"), ("side", "side"), ("it", "iteration"), ("gen", "generate"),
                         ("score", "score"), ("train", "train"), ("bwd", "(backward)"), ("step", "(opt. step)"),
                         ("gc", "(gc)"), ("other", "other"), ("fl", "FLOP/s (% fp32 peak)")]))
    print("\npasses per iteration (both: the same model-sized matmul work, "
          "2NaT + (2Na + 4Nc)T + epochs x 6(Na + Nc)T" + (
              "; with frozen lower blocks TRL runs them in every pass, chatrl once per rollout "
              "(its shared trunk), and each side's FLOP/s counts what it runs" if top >= 0 else "") + "):")
    for k, v in PASSES.items():
        print(f"  {k:7s} {v}")


def main(argv=None) -> int:
    args = parse_args(argv)
    B.quiet_libraries()
    # TRL's statistics take a variance over a single mini-batch's value when there is one mini-batch
    warnings.filterwarnings("ignore", message=r"var\(\): degrees of freedom")
    trl_mods = import_trl() if "trl" in args.sides else None
    B.quiet_libraries()
    from chatrl.engine import ds
    from chatrl.models import resolve_model_path

    t_start = time.time()
    info = B.machine_info()
    for mod in ("accelerate", "datasets"):
        info[mod] = __import__(mod).__version__
    if trl_mods:
        info["trl"] = trl_mods[0].__version__
        info["trl_path"] = str(Path(trl_mods[0].__file__).parent)
    print(f"machine: {info['cpu']} | {info['cpu_count']} cores | torch {info['torch']} | transformers "
          f"{info.get('transformers')} | trl {info.get('trl', '-')} | load average {info['loadavg_at_start']}",
          flush=True)
    path = resolve_model_path(args.model)
    print(f"model: {B.model_label(args.model)} at {path}", flush=True)
    if trl_mods:
        # Accelerate's process state is a singleton: made here, before chatrl's 1-rank process group
        # exists, it stays non-distributed (made after, it would wrap TRL's model in DDP)
        from accelerate import PartialState

        PartialState()
    ds.init_distributed()          # chatrl's 1-rank group, as bench_ppo
    B.quiet_libraries()
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    peaks = {"fp32": B.matmul_peak("fp32", (512, 1024), repeats=2) if args.quick else B.matmul_peak("fp32")}
    print(f"matmul peak fp32: {B.fmt_flops(peaks['fp32']['flops'])} ({threads} threads)", flush=True)
    tok = P._tokenizer(path)
    chatrl_args = _bench_ppo_args(args)
    res = {"machine": info, "args": {k: v for k, v in vars(args).items() if k != "workload_list"},
           "threads": threads, "peaks": peaks, "model_path": path, "workloads": []}
    for _, n in args.workload_list:
        w = {"prompts": n, "target": 2.0 if n >= 16 else 1.5, "rounds": []}
        for r in range(args.rounds):
            # the machine's speed drifts (see README): later rounds alternate which side goes first
            rnd = {}
            for side in (args.sides if r % 2 == 0 else args.sides[::-1]):
                if side == "trl":
                    cfg = P.ppo_config(path, "fp32", n, chatrl_args, "ppo")
                    rnd[side] = run_trl(args, trl_mods, path, tok, n, cfg, peaks["fp32"]["flops"])
                else:
                    rnd[side] = run_chatrl(args, path, tok, n, peaks)
                print(f"{'TRL' if side == 'trl' else side:6s} fp32 x {n}, round {r + 1}: "
                      f"{rnd[side]['samples_per_s']:.3f} samples/s (iteration {rnd[side]['iteration_s']:.2f} s)",
                      flush=True)
            rnd["order"] = list(rnd)
            w["rounds"].append(rnd)
        for side in args.sides:
            w[side] = _over_rounds([rnd[side] for rnd in w["rounds"]])
        if len(args.sides) == 2:
            w["round_ratios"] = [rnd["chatrl"]["samples_per_s"] / rnd["trl"]["samples_per_s"] for rnd in w["rounds"]]
        res["workloads"].append(w)
    res["wall_s"] = time.time() - t_start
    _report(res)
    out = B.write_results("trl-ppo", res, args.out)
    print(f"results: {out} (wall {res['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
