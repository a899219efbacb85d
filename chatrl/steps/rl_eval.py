"""Evaluation of a policy on held-out prompts, during online RL and from `chatrl eval`: greedy
answers and `k` sampled answers per prompt (validation sampling settings, separate from
training), scored by the run's reward sources through the same rollout and score stages.

Metrics (means over the held-out prompts of all ranks):
    eval/greedy/reward, eval/greedy/accuracy      one greedy answer per prompt
    eval/sampled/reward, eval/sampled/accuracy    k sampled answers per prompt (k = 0: none)
    eval/pass@1, eval/pass@k                      unbiased pass@k from the k samples (Chen et al.)
    eval/response_length, time/eval
Accuracy and pass@k need a correctness verifier among the reward sources (math, numeric, exact).
The evaluation draws from its own seeded random stream, so it leaves training's untouched.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from ..data import collate_prompts
from ..engine import ds
from ..rl import pass_at_k
from . import stages


def _sums(trainer, rows: list[dict], params, n: int, batch: int, skip_bad: bool) -> dict:
    tok = trainer.tokenizer
    out = {"reward": 0.0, "answers": 0.0, "correct": 0.0, "length": 0.0, "pass1": 0.0, "passk": 0.0,
           "prompts": 0.0}
    has_acc = False
    for s in range(0, len(rows), batch):
        data = rows[s:s + batch]
        b = collate_prompts(data, tok.pad_token_id)
        ro = stages.rollout(trainer.models.hybrid, b["input_ids"], b["attention_mask"], params,
                            n_samples=n, rows=data, device=trainer.device)
        sc = stages.score(ro, tok, trainer.sources, trainer.weights, skip_bad=skip_bad)
        out["reward"] += float(sc.total.sum())
        out["answers"] += len(sc.total)
        out["length"] += float(ro.action_mask.sum())
        out["prompts"] += len(data)
        if sc.accuracy is not None:
            has_acc = True
            out["correct"] += float(sc.accuracy.sum())
            for c in sc.accuracy.reshape(-1, n).sum(1).long().tolist():
                out["pass1"] += pass_at_k(n, c, 1)
                out["passk"] += pass_at_k(n, c, n)
    out["has_acc"] = float(has_acc)
    return out


@torch.no_grad()
def evaluate_policy(trainer, eval_rows, cfg, seed: int = 0) -> dict:
    """Greedy and sampled answers to up to cfg.eval_prompts held-out prompts (this rank's share)."""
    from .common import eval_batches

    t0 = time.time()
    n_rows = min(cfg.eval_prompts, len(eval_rows))
    world, k = ds.world_size(), cfg.eval_samples
    mine = [i for b in eval_batches(n_rows, n_rows, 1, ds.rank(), world) for i in b]
    rows = [eval_rows[i] for i in mine]
    batch = cfg.per_device_eval_batch_size  # answers per generate call: prompts x samples
    greedy = dataclasses.replace(trainer.gen_params, temperature=0.0)
    sampled = dataclasses.replace(trainer.gen_params, temperature=cfg.eval_temperature,
                                  top_p=cfg.eval_top_p)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        g = _sums(trainer, rows, greedy, 1, batch, cfg.skip_bad_rewards)
        s = _sums(trainer, rows if k else [], sampled, max(k, 1), max(batch // max(k, 1), 1),
                  cfg.skip_bad_rewards)
    keys = ["reward", "answers", "correct", "length", "pass1", "passk", "prompts", "has_acc"]
    vec = torch.tensor([g[x] for x in keys] + [s[x] for x in keys], dtype=torch.float64)
    tot = ds.all_reduce_sum(vec).tolist()
    g, s = dict(zip(keys, tot[:len(keys)])), dict(zip(keys, tot[len(keys):]))
    out = {"eval/greedy/reward": g["reward"] / max(g["answers"], 1),
           "eval/greedy/response_length": g["length"] / max(g["answers"], 1),
           "eval/prompts": g["prompts"]}
    if g["has_acc"]:
        out["eval/greedy/accuracy"] = g["correct"] / max(g["answers"], 1)
    if k:  # --eval-samples 0: greedy answers only
        out.update({"eval/sampled/reward": s["reward"] / max(s["answers"], 1),
                    "eval/response_length": s["length"] / max(s["answers"], 1)})
        if s["has_acc"]:
            out.update({"eval/sampled/accuracy": s["correct"] / max(s["answers"], 1),
                        "eval/pass@1": s["pass1"] / max(s["prompts"], 1),
                        f"eval/pass@{k}": s["passk"] / max(s["prompts"], 1)})
    out["time/eval"] = time.time() - t0
    return out


SAVED_OPTIONS = ("data_path", "seed", "template", "reward_fn", "reward_url", "reward_weights",
                 "answer_column", "format_pattern", "max_prompt_seq_len", "max_answer_seq_len",
                 "temperature", "top_p", "eval_temperature", "eval_top_p")


def _trained_with(path: str) -> dict:
    """The data, reward and length options of the online-RL run that wrote `path` (its
    run_config.yaml beside the actor folder), so the evaluation uses the same held-out split."""
    import yaml
    from pathlib import Path

    f = Path(path).parent / "run_config.yaml"
    saved = yaml.safe_load(f.read_text()) if f.exists() else None
    if not isinstance(saved, dict) or "algo" not in saved:
        return {}
    return {k: saved[k] for k in SAVED_OPTIONS if saved.get(k) is not None}


def eval_rl_main(argv: list[str]) -> int:
    """`chatrl eval rl --path MODEL [options of chatrl grpo]`: the evaluation above for a saved
    model (or any model: "default" is the embedded SmolLM2-135M-Instruct), on the held-out
    prompts of --data-path (default: the arithmetic task) with the run's reward options. For a
    policy written by `chatrl grpo` the run's data, reward and length options are the defaults."""
    import argparse
    import json
    from types import SimpleNamespace

    from .. import config as C
    from ..engine.hybrid import GenerationParams, HybridEngine
    from ..models import load_causal_lm, read_meta, resolve_model_path
    from ..models.load import load_tokenizer
    from .common import template_for
    from .ppo import load_prompts, reward_sources

    parser = argparse.ArgumentParser(prog="chatrl eval rl", description=eval_rl_main.__doc__)
    parser.add_argument("--path", "--model-name-or-path", "--model_name_or_path", dest="path",
                        default="default", help="the model to evaluate")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    C.add_config_args(parser, C.RLConfig, skip=("actor_model_name_or_path", "output_dir"))
    ns = parser.parse_args(argv)
    cli = {k: v for k, v in vars(ns).items() if k not in ("path", "json")}
    path = resolve_model_path(ns.path)
    cfg = C.build_config(C.RLConfig, cli={**_trained_with(path), **cli, "output_dir": "unused",
                                          "actor_model_name_or_path": ns.path})
    tok = load_tokenizer(path, padding_side="left")
    template = template_for(cfg, tok)
    template = read_meta(path).get("template", template) if cfg.template == "auto" else template
    _, eval_rows = load_prompts(cfg, tok, template, "eval")
    sources, weights = reward_sources(cfg)
    dtype = ds.resolve_dtype(cfg.dtype)
    model = load_causal_lm(path, dtype=dtype, tokenizer=tok).to(ds.device()).eval()
    ds.seed_everything(cfg.seed)
    params = GenerationParams(max_new_tokens=cfg.max_answer_seq_len, temperature=cfg.temperature,
                              top_p=cfg.top_p, top_k=cfg.top_k, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id)
    evaluator = SimpleNamespace(models=SimpleNamespace(hybrid=HybridEngine(SimpleNamespace(module=model))),
                                tokenizer=tok, sources=sources, weights=weights, gen_params=params,
                                device=ds.device())
    res = evaluate_policy(evaluator, eval_rows, cfg, seed=cfg.seed)
    res["model"] = path
    if ns.json:
        print(json.dumps(res))
    else:
        print(f"{path} on {int(res['eval/prompts'])} held-out prompts:")
        for k, v in res.items():
            if k.startswith("eval/") and k != "eval/prompts":
                print(f"  {k[5:]:>18}: {v:.4f}")
    return 0
