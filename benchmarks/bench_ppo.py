"""Step-3 (PPO) throughput: end-to-end samples/s, where the time goes, and the hybrid engine's two
generation ratios.

    python benchmarks/bench_ppo.py             # everything, the default model (a few minutes)
    python benchmarks/bench_ppo.py --quick     # everything on the tiny model (< 1 minute)
    deepspeed --num_gpus 2 benchmarks/bench_ppo.py --mode zero3-gather     # part (a) alone

Parts (all in one run by default, --parts to choose):

(a) gather   ZeRO-3 generation on 2 ranks: HybridEngine(gather_once=True) (the full weights gathered
             once per rollout into a hook-free inference copy) vs gather_once=False (DeepSpeed's
             default: every layer's weights all-gathered for every generated token, synced_gpus).
             Same ZeRO-3 actor engine, greedy, same prompts; the tokens must be identical.
             ratio = time(per-token gathering) / time(gather-once)                 target >= 3
             Run as a child `deepspeed --num_gpus 2 ... --mode zero3-gather` (or torchrun).
(b) hybrid   1 rank, ZeRO 0: HybridEngine.generate (as PPO calls it: return_logprobs=True, and
             without) vs plain Transformers `model.generate` on the same module and prompts,
             greedy, forced length, the tokens must be identical.
             ratio = time(model.generate) / time(hybrid)                           target >= 0.8
             Also sampled at T 0.7 (as rollouts are), both recording log-probs:
             model.generate(do_sample=True), whose sampling step is torch.multinomial, against
             the rollout path, whose sampling step is chatrl's inverse-CDF sampler (the same
             distribution; the tokens differ).
(c) workload the reference step-3 workload, 1 rank, through chatrl's own PPOTrainer + RLHFModels
             (build_models): the model as actor and reference, RewardModel of the same folder as
             critic and reward (a random head is fine), B prompts of exactly --prompt-len tokens,
             answers of exactly --answer-len tokens (min_new_tokens = max_new_tokens; sampling at
             the config's temperature), one PPO epoch with mini-batch = B (one actor and one critic
             optimizer step; --ppo-epochs / --train-batch to change). One untimed iteration, then --iters timed ones:
               samples/s = B / iteration time
               generate  = HybridEngine.generate incl. the actor's log-probs from its logits
               score     = reference, critic and reward forwards + rewards + GAE + whitening
               train     = actor + critic forward/backward/step over the experience
             FLOPs (chatrl.steps.ppo.run_ppo's formula; T = prompt + answer tokens of the batch,
             Na / Nc = matmul_params of actor / critic):
               generation 2 Na T; scoring 2 Na T + 4 Nc T; training ppo_epochs x 6 (Na + Nc) T
             generation % of peak = 2 Na T / t_generate / the fp32 (or bf16) matmul peak.
             Default configurations: fp32 x 4 prompts (the reference), bf16 x 4, fp32 x 16, bf16 x 16.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as B  # noqa: E402  (sets the offline / CPU environment before the imports below)

import torch  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", default="all", choices=("all", "zero3-gather"),
                   help="all: every part in this process (part (a) in a 2-rank child); "
                        "zero3-gather: part (a) only, in this process group (use under a launcher)")
    p.add_argument("--quick", action="store_true",
                   help="the tiny model and small settings: checks the script in < 1 minute")
    p.add_argument("--model", default=None, help="model name or folder (default: embedded SmolLM2-135M)")
    p.add_argument("--parts", default="gather,hybrid,workload", help="comma-separated: gather, hybrid, workload")
    p.add_argument("--workloads", default="fp32:4,bf16:4,fp32:16,bf16:16",
                   help="comma-separated dtype:prompts configurations of part (c); the first is the "
                        "reference. A 'grpo/' prefix (grpo/fp32:16) runs the same number of answers "
                        "as GRPO: prompts / --grpo-generations prompts, that many answers each. "
                        "An '@topN' suffix (fp32:16@top8) trains only the top N blocks of actor and "
                        "critic, sharing the frozen trunk; '@topN+noshare' without sharing it; "
                        "'fp16w' (fp32:4@fp16w, fp32:16@top8+fp16w) decodes with --rollout-weights fp16, "
                        "'q8w' with q8_0; 'llamacpp' (fp32:4@llamacpp, fp32:16@top8+llamacpp+fp16w) "
                        "rolls out through --generation-backend llamacpp")
    p.add_argument("--grpo-generations", type=int, default=4, help="answers per prompt of grpo/ workloads")
    p.add_argument("--prototypes", default="",
                   help="comma-separated prototype sets (names joined by '+'; known: no-gc, "
                        "fused-adamw) to run "
                        "the reference workload again with; each patches the library in this "
                        "process only, e.g. --prototypes fused-adamw")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--answer-len", type=int, default=64)
    p.add_argument("--iters", type=int, default=2, help="timed PPO iterations per workload")
    p.add_argument("--train-batch", type=int, default=0, help="PPO mini-batch (0: = prompts)")
    p.add_argument("--ppo-epochs", type=int, default=1, help="PPO epochs over each experience")
    p.add_argument("--gen-batch", type=int, default=4, help="prompts per rank for parts (a) and (b)")
    p.add_argument("--gen-tokens", type=int, default=64, help="new tokens in part (b)")
    p.add_argument("--z3-tokens", type=int, default=32, help="new tokens in part (a)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats in parts (a)/(b) (best kept)")
    p.add_argument("--ranks", type=int, default=2, help="ranks of part (a)")
    p.add_argument("--launcher", default="deepspeed", choices=("deepspeed", "torchrun"))
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: cores / ranks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/ppo-<host>.json)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        if args.model is None:
            args.model = "tiny"
        args.prompt_len, args.answer_len = min(args.prompt_len, 32), min(args.answer_len, 32)
        args.gen_tokens, args.z3_tokens = min(args.gen_tokens, 32), min(args.z3_tokens, 16)
        args.iters, args.repeats = 1, min(args.repeats, 2)
        # a script check, not a measurement: one thread per rank is immune to the OpenMP
        # oversubscription stalls a busy machine causes (see README)
        args.threads = args.threads or 1
        if args.workloads == p.get_default("workloads"):
            args.workloads = "fp32:4,bf16:8"
    return args


def _set_threads(args, world: int) -> int:
    n = args.threads or max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(n)
    return n


# ----------------------------------------------------------------------------- inputs

def make_prompts(tokenizer, n: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n prompts of exactly `length` tokens (no padding): demo-task chat prompts rendered with the
    model's template, earlier demo prompts prepended as context until the row is long enough,
    then cut to the last `length` tokens (so each row still ends where the assistant answers)."""
    from chatrl.data import demo_dataset
    from chatrl.data.templates import render_prompt, resolve_template

    template = resolve_template("auto", tokenizer)
    rows = demo_dataset(seed=seed)["train"]
    texts = [render_prompt(tokenizer, rows[i]["messages"], template) for i in range(min(len(rows), 200))]
    out = []
    for i in range(n):
        ids: list[int] = []
        j = i * 7
        while len(ids) < length:
            ids = tokenizer(texts[j % len(texts)], add_special_tokens=False)["input_ids"] + ids
            j += 1
        out.append(ids[-length:])
    ids = torch.tensor(out, dtype=torch.long)
    return ids, torch.ones_like(ids)


def _tokenizer(path: str):
    from chatrl.models import load_tokenizer

    tok = load_tokenizer(path)
    tok.padding_side = "left"
    return tok


def _best_alternating(fns: dict, repeats: int) -> dict:
    """Each callable once per round, rounds repeated; the best time of each (less contention bias
    than timing one after the other). Returns {name: (best_s, all_s, last_result)}."""
    times = {k: [] for k in fns}
    last = {}
    for _ in range(repeats):
        for k, fn in fns.items():
            with B.Timer() as t:
                last[k] = fn()
            times[k].append(t.s)
    return {k: (min(v), v, last[k]) for k, v in times.items()}


# ----------------------------------------------------------------------------- (a) ZeRO-3 gather

def run_zero3_gather(args) -> dict | None:
    """Part (a) inside an initialised process group (every rank calls it). Rank 0 returns."""
    from chatrl.engine import ds
    from chatrl.engine.hybrid import GenerationParams, HybridEngine
    from chatrl.models import load_causal_lm, resolve_model_path

    ds.init_distributed()
    B.quiet_libraries()
    world, rank = ds.world_size(), ds.rank()
    threads = _set_threads(args, world)
    path = resolve_model_path(args.model)
    tok = _tokenizer(path)
    torch.manual_seed(args.seed)
    model = load_causal_lm(path, dtype="fp32", tokenizer=tok)
    engine = ds.build_engine(model, ds.EngineSpec(zero_stage=3, micro_batch=1, lr=1e-5))
    assert ds.is_zero3(engine.module), "the actor is not partitioned by ZeRO-3"
    # each rank its own prompts (as in PPO); eos suppressed so every rank makes the same number
    ids, mask = make_prompts(tok, args.gen_batch * world, args.prompt_len, args.seed)
    ids, mask = ids[rank::world], mask[rank::world]
    params = GenerationParams(max_new_tokens=args.z3_tokens, min_new_tokens=args.z3_tokens,
                              temperature=0.0, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    once = HybridEngine(engine, gather_once=True)
    per_token = HybridEngine(engine, gather_once=False)
    warm = dataclasses.replace(params, max_new_tokens=2, min_new_tokens=2)

    def timed(h, p):
        ds.barrier()
        with B.Timer() as t:
            out = h.generate(ids, mask, p)
        ds.barrier()
        return t.s, out.sequences

    # first rollout of gather-once builds the inference copy (a one-time cost, reported apart)
    t_first, _ = timed(once, params)
    timed(per_token, warm)
    t_once, t_tok, seq_once, seq_tok = [], [], None, None
    for _ in range(args.repeats if not args.quick else 1):
        s, seq_once = timed(once, params)
        t_once.append(s)
    s, seq_tok = timed(per_token, params)      # the slow path: once is enough
    t_tok.append(s)
    # where gather-once's time goes: the gather alone (chatrl's full_state_dict: one collective
    # per parameter) and, for comparison, one GatheredParameters over every parameter at once
    ds.barrier()
    with B.Timer() as t_fsd:
        ds.full_state_dict(engine.module)
    import deepspeed

    ds.barrier()
    with B.Timer() as t_bulk:
        params_all = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params_all, modifier_rank=None):
            {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    ds.barrier()
    same = torch.equal(seq_once, seq_tok)
    all_same = int(ds.all_reduce_sum(torch.tensor([0 if same else 1])).item()) == 0
    gathered_numel = sum(p.ds_numel for p in engine.module.parameters())
    res = {"ranks": world, "threads_per_rank": threads, "prompts_per_rank": ids.shape[0],
           "prompt_len": args.prompt_len, "new_tokens": args.z3_tokens,
           "gather_once_s": min(t_once), "gather_once_all_s": t_once, "gather_once_first_s": t_first,
           "per_token_s": min(t_tok), "gather_full_state_dict_s": t_fsd.s,
           "gather_bulk_prototype_s": t_bulk.s, "ratio": min(t_tok) / min(t_once), "tokens_identical": all_same,
           "params": gathered_numel, "target_ratio": 3.0}
    if not all_same:
        raise AssertionError("ZeRO-3 generation: gather-once and per-token gathering produced "
                             "different tokens")
    return res if ds.is_main() else None


def launch_zero3(args) -> dict:
    """Part (a) as a child run on `args.ranks` ranks; returns its JSON."""
    out = Path(tempfile.mkdtemp(prefix="bench-z3-")) / "z3.json"
    script = str(Path(__file__).resolve())
    child = ["--mode", "zero3-gather", "--out", str(out), "--prompt-len", str(args.prompt_len),
             "--gen-batch", str(args.gen_batch), "--z3-tokens", str(args.z3_tokens),
             "--repeats", str(args.repeats), "--seed", str(args.seed)]
    if args.model:
        child += ["--model", args.model]
    if args.quick:
        child += ["--quick"]
    if args.threads:
        child += ["--threads", str(args.threads)]
    bindir = Path(sys.executable).parent
    env = dict(os.environ)
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.pop("LOCAL_RANK", None)
    env.pop("MASTER_PORT", None)
    if args.launcher == "deepspeed":
        exe = shutil.which("deepspeed", path=str(bindir)) or "deepspeed"
        from chatrl.engine.ds import _free_port

        cmd = [exe, "--num_gpus", str(args.ranks), "--master_port", str(_free_port()), script, *child]
    else:
        exe = shutil.which("torchrun", path=str(bindir)) or "torchrun"
        cmd = [exe, "--standalone", "--nproc_per_node", str(args.ranks), script, *child]
    print(f"(a) launching: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not out.exists():
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        raise RuntimeError(f"the 2-rank ZeRO-3 run failed (exit {proc.returncode}):\n{tail}")
    res = json.loads(out.read_text())
    res["child_wall_s"] = time.time() - t0
    res["command"] = " ".join(cmd)
    shutil.rmtree(out.parent, ignore_errors=True)
    return res


# ----------------------------------------------------------------------------- (b) hybrid vs HF

def run_hybrid_vs_hf(args, path: str, tok) -> dict:
    from chatrl.engine import ds
    from chatrl.engine.hybrid import GenerationParams, HybridEngine, hf_generate
    from chatrl.models import load_causal_lm

    torch.manual_seed(args.seed)
    model = load_causal_lm(path, dtype="fp32", tokenizer=tok)
    engine = ds.build_engine(model, ds.EngineSpec(zero_stage=0, micro_batch=args.gen_batch, lr=1e-5))
    engine.train()   # as during PPO: the hybrid engine switches it to eval and back
    hybrid = HybridEngine(engine)
    ids, mask = make_prompts(tok, args.gen_batch, args.prompt_len, args.seed)
    params = GenerationParams(max_new_tokens=args.gen_tokens, min_new_tokens=args.gen_tokens,
                              temperature=0.0, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    module = engine.module

    def plain():
        module.eval()
        with torch.no_grad():
            out = hf_generate(module, ids, mask, params).sequences
        module.train()
        return out

    # Sampled as PPO samples (T 0.7, no top-k/top-p): Transformers' own sampling step
    # (torch.multinomial) against the rollout path (chatrl's inverse-CDF sampler, log-probs kept).
    sampled = dataclasses.replace(params, temperature=0.7)

    def plain_sampled():   # with the same log-prob recorder: only the sampling step differs
        from chatrl.engine.hybrid import LogprobRecorder

        module.eval()
        with torch.no_grad():
            out = module.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=0.7,
                                  top_k=0, top_p=1.0, max_new_tokens=args.gen_tokens,
                                  min_new_tokens=args.gen_tokens, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id, logits_processor=[LogprobRecorder(0.7)])
        module.train()
        return out

    # --rollout-weights fp16 copies frozen weights only: frozen here for the call, as a run with
    # every block frozen below the trained ones would have them (packed at the first call)
    hybrid16 = HybridEngine(engine, rollout_weights="fp16")

    def fp16_frozen():
        trained = [p for p in module.parameters() if p.requires_grad]
        for p in trained:
            p.requires_grad_(False)
        try:
            return hybrid16.generate(ids, mask, sampled, return_logprobs=True)
        finally:
            for p in trained:
                p.requires_grad_(True)

    # --generation-backend llamacpp: each call converts and loads the weights, as each rollout
    # does, then decodes. With every weight frozen (as fp16_frozen) the conversion is cached and
    # only the load remains; "same, every weight trained" converts all of them each call.
    from chatrl.engine import llamacpp
    from chatrl.models.load import unwrap

    llama = ({kind: HybridEngine(engine, backend="llamacpp", rollout_weights=kind) for kind in llamacpp.KINDS}
             if llamacpp.unsupported(unwrap(module).config, "cpu") is None else {})

    def llama_sampled(kind, frozen=True):
        trained = [p for p in module.parameters() if p.requires_grad] if frozen else []
        for p in trained:
            p.requires_grad_(False)
        try:
            return llama[kind].generate(ids, mask, sampled, return_logprobs=True)
        finally:
            for p in trained:
                p.requires_grad_(True)

    fns = {"hf": plain,
           "hybrid": lambda: hybrid.generate(ids, mask, params).sequences,
           "hybrid_logprobs": lambda: hybrid.generate(ids, mask, params, return_logprobs=True).sequences,
           "hf_sampled": plain_sampled,
           "hybrid_sampled": lambda: hybrid.generate(ids, mask, sampled, return_logprobs=True).sequences,
           "fp16w_frozen": lambda: fp16_frozen().sequences,
           **{f"llamacpp_{k}": (lambda k=k: llama_sampled(k).sequences) for k in llama},
           **({"llamacpp_same_trained": lambda: llama_sampled("same", frozen=False).sequences} if llama else {})}
    for fn in fns.values():   # warm-up
        fn()
    best = _best_alternating(fns, args.repeats)
    greedy = ("hf", "hybrid", "hybrid_logprobs")
    same = all(torch.equal(best["hf"][2], best[k][2]) for k in greedy)
    if not same:
        raise AssertionError("hybrid engine and model.generate produced different tokens")
    new = args.gen_batch * args.gen_tokens
    # fidelity: recorded log-probs against the fp32 model's on the same tokens
    def gap_of(fn):
        torch.manual_seed(args.seed)
        g = fn()
        module.eval()
        with torch.no_grad():
            logits = module(input_ids=g.sequences, attention_mask=torch.cat(
                [mask, torch.ones_like(g.sequences[:, ids.shape[1]:])], 1)).logits
        module.train()
        P = ids.shape[1]
        lp = torch.log_softmax(logits[:, P - 1:-1].float() / 0.7, -1).gather(
            -1, g.sequences[:, P:, None])[..., 0]
        return (lp - g.logprobs).abs()

    gap = gap_of(fp16_frozen)
    llama_res = {}
    for k in [*llama, *(["same_trained"] if llama else [])]:
        g = gap_of(lambda k=k: llama_sampled(k.removesuffix("_trained"), frozen=k in llama))
        llama_res[k] = {"s": best[f"llamacpp_{k}"][0], "new_tokens_per_s": new / best[f"llamacpp_{k}"][0],
                        "ratio_to_rollout_path": best["hybrid_sampled"][0] / best[f"llamacpp_{k}"][0],
                        "logprob_gap_mean": g.mean().item(), "logprob_gap_max": g.max().item()}
    res = {"prompts": args.gen_batch, "prompt_len": args.prompt_len, "new_tokens": args.gen_tokens,
           "hf_s": best["hf"][0], "hybrid_s": best["hybrid"][0],
           "hybrid_logprobs_s": best["hybrid_logprobs"][0],
           "all_s": {k: v[1] for k, v in best.items()},
           "ratio": best["hf"][0] / best["hybrid"][0],
           "ratio_logprobs": best["hf"][0] / best["hybrid_logprobs"][0],
           "hf_new_tokens_per_s": new / best["hf"][0], "tokens_identical": same, "target_ratio": 0.8,
           "hf_sampled_s": best["hf_sampled"][0], "hybrid_sampled_s": best["hybrid_sampled"][0],
           "ratio_sampled": best["hf_sampled"][0] / best["hybrid_sampled"][0],
           "hybrid_sampled_new_tokens_per_s": new / best["hybrid_sampled"][0],
           "fp16w_frozen_s": best["fp16w_frozen"][0],
           "ratio_fp16w_frozen": best["hybrid_sampled"][0] / best["fp16w_frozen"][0],
           "fp16w_frozen_new_tokens_per_s": new / best["fp16w_frozen"][0],
           "fp16w_logprob_gap_mean": gap.mean().item(), "fp16w_logprob_gap_max": gap.max().item(),
           "llamacpp_sampled": llama_res}
    del engine, model, hybrid, hybrid16, llama
    gc.collect()
    return res


# ----------------------------------------------------------------------------- (c) workload

def ppo_config(path: str, dtype: str, prompts: int, args, algo: str = "ppo", top: int = -1,
               share: bool = True, rollout_weights: str = "same", generation_backend: str = "hf"):
    """PPO: `prompts` prompts, one answer each, the model as critic and reward model (a random
    value head is allowed). GRPO: prompts / G prompts with G answers each (the same number of
    answers), no critic, no reference model (KL 0), rewards from a function (letter_share)."""
    from chatrl.config import PPOConfig, RLConfig, build_config

    mb = args.train_batch or prompts
    common = {"actor_model_name_or_path": path, "per_device_training_batch_size": mb,
              "generation_batches": 1, "ppo_epochs": args.ppo_epochs, "max_prompt_seq_len": args.prompt_len,
              "max_answer_seq_len": args.answer_len, "dtype": dtype, "num_warmup_steps": 0,
              "seed": args.seed, "enable_ema": False, "print_answers": False,
              "actor_num_layers_unfrozen": top, "share_frozen_trunk": share,
              "rollout_weights": rollout_weights, "generation_backend": generation_backend}
    if algo == "grpo":
        g = args.grpo_generations
        if prompts % g:
            raise SystemExit(f"grpo/ workloads: {prompts} answers is not a multiple of --grpo-generations {g}")
        return build_config(RLConfig, cli={**common, "algo": "grpo", "num_generations": g,
                                           "per_device_generation_batch_size": prompts // g}, validate=False)
    return build_config(PPOConfig, cli={**common, "critic_model_name_or_path": path,
                                        "per_device_generation_batch_size": prompts,
                                        "critic_num_layers_unfrozen": top,
                                        "allow_untrained_reward_head": True}, validate=False)


class LetterShare:
    """The GRPO workload's reward function: the share of letters in the answer's text (cheap,
    deterministic, and different between answers, so every group carries a signal)."""
    name, is_correctness = "letter_share", False

    def __call__(self, batch):
        return [sum(c.isalpha() for c in t) / max(len(t), 1) for t in batch.texts]


def run_workload(args, path: str, tok, dtype: str, prompts: int, peaks: dict, algo: str = "ppo",
                 top: int = -1, share: bool = True, rollout_weights: str = "same",
                 generation_backend: str = "hf") -> dict:
    from chatrl.engine import ds
    from chatrl.engine.flops import matmul_params, train_flops_per_token
    from chatrl.steps.ppo import PPOTrainer, build_models, update_epochs

    cfg = ppo_config(path, dtype, prompts, args, algo, top, share, rollout_weights, generation_backend)
    ds.seed_everything(args.seed)
    n_iters = args.iters + 1
    mb = cfg.per_device_training_batch_size
    with B.Timer() as t_build:
        models = build_models(cfg, tok, n_iters * cfg.ppo_epochs * max(prompts // mb, 1), dtype)
    trainer = PPOTrainer(models, cfg, *(([LetterShare()], [1.0]) if algo == "grpo" else ()))
    # answers of exactly answer_len tokens (the EOS is suppressed until then)
    trainer.gen_params = dataclasses.replace(trainer.gen_params, min_new_tokens=cfg.max_answer_seq_len)
    Na = matmul_params(models.actor.module)
    Nc = matmul_params(models.critic.module) if models.critic is not None else 0
    Nr = Nc if models.reward is not None else 0  # PPO here: the reward model is the critic's folder
    Nref = Na if models.ref is not None else 0
    ids, mask = make_prompts(tok, cfg.per_device_generation_batch_size, args.prompt_len, args.seed)
    from chatrl.engine import hybrid as hybrid_mod

    probes = B.Probes()
    for who in ("actor", "critic"):
        engine = getattr(models, who)
        if engine is None:
            continue
        probes.method(f"{who}_backward_s", engine, "backward")
        probes.method(f"{who}_step_s", engine, "step")
    probes.function("gen_empty_cache_s", hybrid_mod, "_empty_cache")

    from chatrl.engine.memory import peak_rss_gb, reset_peak_rss

    iters = []
    for it in range(n_iters):
        probes.take()
        reset_peak_rss()
        with B.Timer() as t_it:
            exp = trainer.generate_experience(ids, mask, it)
            st = dict(trainer.last_stats)
            with B.Timer() as t_train:
                update_epochs(trainer, [exp])  # run_ppo's stage 4 itself
        T = int(exp.attention_mask.sum())
        row = {"iteration_s": t_it.s, "generate_s": st["time/generate"], "score_s": st["time/score"],
               "train_s": t_train.s, "tokens": T, "generated": int(st["tokens/generated"]),
               "answer_len": exp.action_mask.shape[1], "peak_rss_gb": peak_rss_gb()}
        row["other_s"] = row["iteration_s"] - row["generate_s"] - row["score_s"] - row["train_s"]
        row.update({k: 0.0 for k in ("actor_backward_s", "actor_step_s", "critic_backward_s",
                                      "critic_step_s", "gen_empty_cache_s")})
        row.update(probes.take())
        row["train_forward_s"] = row["train_s"] - sum(row[k] for k in ("actor_backward_s", "actor_step_s",
                                                                      "critic_backward_s", "critic_step_s"))
        if it > 0:                      # iteration 0 is the warm-up
            iters.append(row)
    assert all(r["answer_len"] == args.answer_len and r["generated"] == prompts * args.answer_len
               for r in iters), "answers were not of the forced length"
    probes.close()
    mean = {k: sum(r[k] for r in iters) / len(iters) for k in iters[0]}
    T = mean["tokens"]
    f_gen = 2 * Na * T
    f_score = 2 * (Nref + Nc + Nr) * T  # reference, critic and reward-model forwards (PPO: 2NaT + 4NcT)
    f_train = cfg.ppo_epochs * 6 * (Na + Nc) * T
    if top >= 0:  # frozen lower blocks: the FLOPs run (as chatrl.steps.ppo.run_ppo counts them)
        skipped = {r: 2 * s.skipped_params(getattr(models, r).module) for r, s in trainer.trunk.items()}
        per_token = sum(train_flops_per_token(e.module) for e in (models.actor, models.critic) if e is not None)
        f_train = cfg.ppo_epochs * (per_token - sum(skipped.values())) * T
        if getattr(trainer.trunk.get("critic"), "twin", None) is not None:
            f_score -= skipped["critic"] * T
        if trainer.score_skips_reference_trunk:  # the actor's trunk recorded in the rollout
            f_score -= skipped["actor"] * T
    peak = peaks[dtype]["flops"]
    res = {"algo": algo, "dtype": dtype, "layers_unfrozen": top, "rollout_weights": trainer.models.hybrid.rollout_weights, "generation_backend": trainer.models.hybrid.backend_name, "trunk_shared": sorted(trainer.trunk), "prompts": prompts, "group_size": cfg.num_generations if algo == "grpo" else 1, "train_batch": mb, "ppo_epochs": cfg.ppo_epochs,
           "prompt_len": args.prompt_len,
           "answer_len": args.answer_len, "iterations": len(iters), "build_s": t_build.s,
           "matmul_params_actor": Na, "matmul_params_critic": Nc,
           **{k: mean[k] for k in ("iteration_s", "generate_s", "score_s", "train_s", "other_s")},
           "breakdown_s": {k: mean[k] for k in ("gen_empty_cache_s", "train_forward_s", "actor_backward_s",
                                                "actor_step_s", "critic_backward_s", "critic_step_s")},
           "peak_rss_gb": max(r["peak_rss_gb"] for r in iters),  # the process, models included
           "samples_per_s": prompts / mean["iteration_s"],
           "samples_per_s_best": max(prompts / r["iteration_s"] for r in iters),
           "generated_tokens_per_s": prompts * args.answer_len / mean["generate_s"],
           "flops_per_s": (f_gen + f_score + f_train) / mean["iteration_s"],
           "gen_flops_per_s": f_gen / mean["generate_s"], "score_flops_per_s": f_score / mean["score_s"],
           "train_flops_per_s": f_train / mean["train_s"], "peak_flops_per_s": peak,
           "all_iterations": iters}
    res["gen_pct_of_peak"] = 100 * res["gen_flops_per_s"] / peak
    res["train_pct_of_peak"] = 100 * res["train_flops_per_s"] / peak
    res["score_pct_of_peak"] = 100 * res["score_flops_per_s"] / peak if f_score else None
    res["pct_of_peak"] = 100 * res["flops_per_s"] / peak
    del trainer, models
    gc.collect()
    return res


# ----------------------------------------------------------------------------- main

def workload_label(w: dict) -> str:
    label = f"{w['dtype']} x {w['prompts']}" + (f" [{w['prototypes']}]" if w.get("prototypes") else "")
    if w.get("layers_unfrozen", -1) >= 0:
        label += f", top {w['layers_unfrozen']} blocks" + (
            " (trunk shared)" if w.get("trunk_shared") else " (trunk not shared)")
    if w.get("rollout_weights", "same") != "same":
        label += f", {w['rollout_weights']} rollout weights"
    if w.get("generation_backend", "hf") != "hf":
        label += f", {w['generation_backend']} rollouts"
    if w.get("algo") == "grpo":
        label += f" GRPO ({w['prompts'] // w['group_size']} x {w['group_size']})"
    return label


def _print_report(res: dict) -> None:
    print()
    if "zero3_gather" in res:
        a = res["zero3_gather"]
        print(f"(a) ZeRO-3 generation, {a['ranks']} ranks x {a['threads_per_rank']} threads, "
              f"{a['prompts_per_rank']} prompts/rank x {a['new_tokens']} new tokens (greedy):")
        print(f"    gather-once {a['gather_once_s']:.2f} s (first rollout, building the copy: "
              f"{a['gather_once_first_s']:.2f} s) | per-token gathering {a['per_token_s']:.2f} s | "
              f"ratio {a['ratio']:.1f}x (target >= 3x) | tokens identical: {a['tokens_identical']}")
        print(f"    inside gather-once: full_state_dict {a['gather_full_state_dict_s']:.2f} s (one "
              f"all-gather per parameter); prototype, one GatheredParameters over all: "
              f"{a['gather_bulk_prototype_s']:.2f} s")
    if "hybrid_vs_hf" in res:
        b = res["hybrid_vs_hf"]
        print(f"(b) 1 rank, {b['prompts']} prompts x {b['new_tokens']} new tokens (greedy): "
              f"model.generate {b['hf_s']:.2f} s | hybrid {b['hybrid_s']:.2f} s (ratio {b['ratio']:.2f}x) | "
              f"hybrid + log-probs {b['hybrid_logprobs_s']:.2f} s (ratio {b['ratio_logprobs']:.2f}x) "
              f"(target >= 0.8x) | tokens identical: {b['tokens_identical']}")
        print(f"    sampled at T 0.7, log-probs recorded: model.generate (torch.multinomial) "
              f"{b['hf_sampled_s']:.2f} s | "
              f"hybrid + log-probs (inverse-CDF sampler) {b['hybrid_sampled_s']:.2f} s "
              f"({b['hybrid_sampled_new_tokens_per_s']:.1f} tok/s, ratio {b['ratio_sampled']:.2f}x)")
        print(f"    --rollout-weights fp16, every weight frozen (fp16 copies): {b['fp16w_frozen_s']:.2f} s "
              f"({b['fp16w_frozen_new_tokens_per_s']:.1f} tok/s, {b['ratio_fp16w_frozen']:.2f}x the rollout "
              f"path) | log-prob gap to fp32 mean {b['fp16w_logprob_gap_mean']:.2g}, "
              f"max {b['fp16w_logprob_gap_max']:.2g}")
        for k, v in b.get("llamacpp_sampled", {}).items():
            what = ("every weight trained: all converted and loaded each call" if k.endswith("_trained")
                    else "every weight frozen: converted once, loaded each call")
            print(f"    --generation-backend llamacpp --rollout-weights {k.removesuffix('_trained')} ({what}): "
                  f"{v['s']:.2f} s ({v['new_tokens_per_s']:.1f} tok/s, "
                  f"{v['ratio_to_rollout_path']:.2f}x the rollout path) | log-prob gap to fp32 mean "
                  f"{v['logprob_gap_mean']:.2g}, max {v['logprob_gap_max']:.2g}")
    if res.get("workloads"):
        w0 = res["workloads"][0]
        print(f"(c) PPO iteration, {w0['prompt_len']}-token prompts, {w0['answer_len']}-token answers, "
              f"{w0['ppo_epochs']} PPO epoch(s) over mini-batches of {w0['train_batch']}, 1 rank "
              "(reference = first row):")
        rows = []
        for w in res["workloads"]:
            it = w["iteration_s"]
            rows.append({"cfg": workload_label(w), "sps": f"{w['samples_per_s']:.3f}",
                         "it": f"{it:.2f}",
                         "gen": f"{w['generate_s']:.2f} ({100 * w['generate_s'] / it:.0f}%)",
                         "score": f"{w['score_s']:.2f} ({100 * w['score_s'] / it:.0f}%)",
                         "train": f"{w['train_s']:.2f} ({100 * w['train_s'] / it:.0f}%)",
                         "other": f"{w['other_s']:.2f}",
                         "gtok": f"{w['generated_tokens_per_s']:.0f}",
                         "genfl": f"{B.fmt_flops(w['gen_flops_per_s'])} ({w['gen_pct_of_peak']:.1f}%)",
                         "scfl": (f"{B.fmt_flops(w['score_flops_per_s'])} ({w['score_pct_of_peak']:.1f}%)"
                                  if w.get("score_pct_of_peak") is not None else "-"),
                         "trfl": f"{B.fmt_flops(w['train_flops_per_s'])} ({w['train_pct_of_peak']:.1f}%)",
                         "rss": f"{w['peak_rss_gb']:.2f}",
                         "fl": f"{B.fmt_flops(w['flops_per_s'])} ({w['pct_of_peak']:.1f}%)"})
        print(B.table(rows, [("cfg", "dtype x prompts"), ("sps", "samples/s"), ("it", "iter s"),
                             ("gen", "generate s"), ("score", "score s"), ("train", "train s"),
                             ("other", "other s"), ("gtok", "gen tok/s"),
                             ("genfl", "generation FLOP/s (% peak)"), ("scfl", "scoring FLOP/s (% peak)"),
                             ("trfl", "training FLOP/s (% peak)"), ("fl", "overall FLOP/s (% peak)"),
                             ("rss", "peak RSS GB")]))
        print("    FLOPs: generation 2NaT, scoring (2Na + 4Nc)T, training 6(Na + Nc)T per PPO epoch; "
              "T = prompt + answer tokens; % of the matmul peak of the row's dtype. GRPO rows: the same "
              "number of answers (prompts / G, G answers each), no critic, no reference model, a reward "
              "function: generation 2NaT, scoring 0, training 6NaT")
        print("    issue targets: ~0.3 samples/s today on the fp32 x 4 reference, ours >= 0.6")
        brows = []
        for w, r in zip(res["workloads"], rows):
            b = w["breakdown_s"]
            brows.append({"cfg": r["cfg"], **{k: f"{v:.2f}" for k, v in b.items()}})
        print("    inside generate and train (seconds per iteration):")
        print(B.table(brows, [("cfg", "dtype x prompts"), ("gen_empty_cache_s", "gen: gc/empty_cache"),
                              ("train_forward_s", "train: forwards+losses"),
                              ("actor_backward_s", "actor backward"), ("actor_step_s", "actor step"),
                              ("critic_backward_s", "critic backward"), ("critic_step_s", "critic step")]))


def main(argv=None) -> int:
    args = parse_args(argv)
    B.quiet_libraries()
    if args.mode == "zero3-gather":
        res = run_zero3_gather(args)
        if res is not None:
            if args.out:
                B.write_results("ppo-zero3", res, args.out)
            else:
                _print_report({"zero3_gather": res})
        return 0

    from chatrl.engine import ds
    from chatrl.models import resolve_model_path

    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - {"gather", "hybrid", "workload"}
    if unknown:
        raise SystemExit(f"--parts: unknown {', '.join(sorted(unknown))}")
    workloads = []
    for w in args.workloads.split(","):
        w, _, frozen = w.strip().partition("@")
        opts = frozen.split("+") if frozen else []
        if any(o not in ("noshare", "fp16w", "q8w", "llamacpp") and not (o.startswith("top") and o[3:].isdigit())
               for o in opts):
            raise SystemExit(f"--workloads: {frozen!r}: use @topN, @topN+noshare, @fp16w, @q8w, @llamacpp")
        top = next((int(o[3:]) for o in opts if o.startswith("top")), -1)
        algo = "grpo" if w.startswith("grpo/") else "ppo"
        d, n, proto = (w.removeprefix("grpo/").split(":") + [""])[:3]
        if d not in B.DTYPES or not n.isdigit():
            raise SystemExit(f"--workloads: {w!r} is not [grpo/]dtype:prompts[:prototypes] (e.g. fp32:4)")
        B.prototypes(proto)   # validates the names
        workloads.append((d, int(n), proto, algo, top, "noshare" not in opts,
                          "fp16" if "fp16w" in opts else "q8_0" if "q8w" in opts else "same",
                          "llamacpp" if "llamacpp" in opts else "hf"))
    if args.prototypes:     # the reference configuration again, with library prototypes patched in
        for proto in args.prototypes.split(","):
            B.prototypes(proto)
            workloads.append((*workloads[0][:2], proto, *workloads[0][3:]))
    t_start = time.time()
    info = B.machine_info()
    print(f"machine: {info['cpu']} | {info['cpu_count']} cores | torch {info['torch']} | load average "
          f"{info['loadavg_at_start']}", flush=True)
    path = resolve_model_path(args.model)
    print(f"model: {B.model_label(args.model)} at {path}", flush=True)
    res: dict = {"machine": info, "args": vars(args), "model_path": path}

    if "gather" in parts:     # first: a child process group, before this process's own
        res["zero3_gather"] = launch_zero3(args)
        _print_report({"zero3_gather": res["zero3_gather"]})

    ds.init_distributed()
    B.quiet_libraries()
    res["threads"] = _set_threads(args, 1)
    peaks = {}
    for d in sorted({w[0] for w in workloads} | {"fp32"}):
        peaks[d] = B.matmul_peak(d, (512, 1024), repeats=2) if args.quick else B.matmul_peak(d)
        print(f"matmul peak {d}: {B.fmt_flops(peaks[d]['flops'])} ({res['threads']} threads)", flush=True)
    res["peaks"] = peaks
    tok = _tokenizer(path)

    if "hybrid" in parts:
        res["hybrid_vs_hf"] = run_hybrid_vs_hf(args, path, tok)
        _print_report({"hybrid_vs_hf": res["hybrid_vs_hf"]})
    if "workload" in parts:
        res["workloads"] = []
        for d, n, proto, algo, top, share, rollout_weights, backend in workloads:
            with B.prototypes(proto):
                w = run_workload(args, path, tok, d, n, peaks, algo, top, share, rollout_weights, backend)
            w["prototypes"] = proto
            res["workloads"].append(w)
            label = workload_label(w)
            print(f"(c) {label}: {w['samples_per_s']:.3f} samples/s (iteration {w['iteration_s']:.2f} s: "
                  f"generate {w['generate_s']:.2f}, score {w['score_s']:.2f}, train {w['train_s']:.2f})",
                  flush=True)
    res["wall_s"] = time.time() - t_start
    _print_report(res)
    out = B.write_results("ppo", res, args.out)
    print(f"results: {out} (wall {res['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
