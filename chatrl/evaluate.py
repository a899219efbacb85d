"""Evaluation: reward models on pairs, and models' answers to the same prompts side by side.

    chatrl eval reward  --path RM [--data-path SRC ...]      accuracy, mean chosen/rejected scores
    chatrl eval prompts --base A --finetuned B [--finetuned C]  answers side by side (+ judge scores
                                                              on the demo task)
    chatrl eval rl --path MODEL [--data-path arith] [--reward-fn numeric] [--eval-samples 4]
                                  held-out reward, accuracy and pass@k, greedy and sampled
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .data.templates import render_prompt, resolve_template, strip_stop


@dataclass
class Answers:
    model: str
    texts: list[str]
    scores: list[float] | None = None

    @property
    def mean_score(self) -> float | None:
        return sum(self.scores) / len(self.scores) if self.scores else None


def model_template(path: str, tokenizer, template: str = "auto") -> str:
    from .models import read_meta

    if template == "auto":
        template = read_meta(path).get("template", "auto")
    return resolve_template(template, tokenizer)


@torch.no_grad()
def generate_answers(path: str, prompts: list[list[dict]], max_new_tokens: int = 64,
                     temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                     batch_size: int = 8, samples: int = 1, template: str = "auto") -> list[list[str]]:
    """Answers of the model at `path` to each prompt (messages); `samples` answers per prompt."""
    from .models import load_causal_lm, load_tokenizer, resolve_model_path

    path = resolve_model_path(path)
    tok = load_tokenizer(path, padding_side="left")
    model = load_causal_lm(path, tokenizer=tok).eval()
    template = model_template(path, tok, template)
    texts = [render_prompt(tok, m, template) for m in prompts]
    from .logging import progress_iter

    torch.manual_seed(seed)
    out: list[list[str]] = [[] for _ in prompts]
    for _ in range(samples):
        for i in progress_iter(range(0, len(texts), batch_size), f"answers {Path(path).name}"):
            enc = tok(texts[i:i + batch_size], return_tensors="pt", padding=True,
                      add_special_tokens=template == "plain")
            kw = {"do_sample": temperature > 0}
            if temperature > 0:
                kw.update(temperature=temperature, top_p=top_p)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id, **kw)
            for j, seq in enumerate(gen[:, enc["input_ids"].shape[1]:]):
                out[i + j].append(strip_stop(tok.decode(seq, skip_special_tokens=True), template))
    return out


def judge_answers(prompts: list[list[dict]], answers: list[list[str]]) -> list[float]:
    """Mean demo-task judge score per prompt over its sampled answers."""
    from .data.demo import judge

    return [sum(judge(p, a) for a in ans) / len(ans) for p, ans in zip(prompts, answers)]


def compare_models(models: dict[str, str], prompts: list[list[dict]], *, judge: bool,
                   max_new_tokens: int = 64, temperature: float = 0.0, samples: int = 1,
                   seed: int = 0, batch_size: int = 8) -> dict[str, Answers]:
    """Every model answers the same prompts (same seed); judge scores if the prompts are demo ones."""
    results = {}
    for label, path in models.items():
        ans = generate_answers(path, prompts, max_new_tokens, temperature, seed=seed, samples=samples,
                               batch_size=batch_size)
        scores = judge_answers(prompts, ans) if judge else None
        results[label] = Answers(path, [a[0] for a in ans], scores)
    return results


def eval_reward(path: str, data_path: list[str], data_split: str = "2,4,4", seed: int = 1234,
                max_seq_len: int = 512, batch_size: int = 16, split: str = "eval",
                template: str = "auto", dtype: str = "fp32") -> dict:
    """Accuracy and mean scores of a saved reward model on the pairs of `data_path`.

    By default the held-out pairs of step 2's slice: the same pairs `chatrl rm` evaluated on.
    """
    from .data import build_step_data, collate_pairs, tokenize_step_data
    from .models import load_tokenizer, resolve_model_path
    from .models.reward import RewardModel
    from .steps.reward import evaluate_pairs

    path = resolve_model_path(path)
    tok = load_tokenizer(path)
    template = model_template(path, tok, template)
    raw = build_step_data(list(data_path), data_split, 2, seed=seed)
    rows = raw.eval if split == "eval" else raw.train
    pairs, _ = tokenize_step_data(rows, tok, step="rm", template=template, max_seq_len=max_seq_len)
    from .engine.ds import resolve_dtype

    # Score in the precision the model was trained and evaluated with (its run config's dtype).
    model = RewardModel.from_pretrained(path, dtype=resolve_dtype(dtype), tokenizer=tok).eval()
    with torch.no_grad():
        return evaluate_pairs(model, pairs, lambda r: collate_pairs(r, tok.pad_token_id), batch_size,
                              10**9, world_rank=(0, 1)) | {"model": path, "split": split,
                                                         "template": template}


def _saved_data_args(path: str) -> dict:
    """The data options a step was trained with (from its run_config.yaml), to evaluate alike."""
    import yaml

    from .models import resolve_model_path

    f = Path(resolve_model_path(path)) / "run_config.yaml"
    if not f.exists():
        return {}
    cfg = yaml.safe_load(f.read_text()) or {}
    return {k: cfg[k] for k in ("data_path", "data_split", "seed", "max_seq_len", "template", "dtype")
            if k in cfg}


def eval_main(argv: list[str]) -> int:
    if argv and argv[0] == "rl":
        from .steps.rl_eval import eval_rl_main

        return eval_rl_main(argv[1:])
    parser = argparse.ArgumentParser(prog="chatrl eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    r = sub.add_parser("reward", help="score chosen/rejected pairs with a saved reward model")
    r.add_argument("--path", "--model-name-or-path", "--model_name_or_path", dest="path", required=True)
    r.add_argument("--data-path", "--data_path", dest="data_path", nargs="+", default=None,
                   help="pairs to score (default: the data the model was trained on)")
    r.add_argument("--data-split", "--data_split", dest="data_split", default=None)
    r.add_argument("--split", choices=("eval", "train"), default="eval")
    r.add_argument("--seed", type=int, default=None)
    r.add_argument("--max-seq-len", "--max_seq_len", dest="max_seq_len", type=int, default=None)
    r.add_argument("--batch-size", type=int, default=16)
    r.add_argument("--dtype", default=None, help="scoring precision (default: the model's training dtype)")
    r.add_argument("--json", action="store_true", help="print JSON")
    p = sub.add_parser("prompts", help="answers of a base and fine-tuned model(s) side by side")
    p.add_argument("--base", "--model_name_or_path_baseline", dest="base", required=True)
    p.add_argument("--finetuned", "--model_name_or_path_finetune", dest="finetuned", action="append",
                   required=True)
    p.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable); default: "
                   "the demo task's held-out prompts")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    if args.what == "reward":
        saved = _saved_data_args(args.path)
        res = eval_reward(args.path, args.data_path or saved.get("data_path", ["demo"]),
                          args.data_split or saved.get("data_split", "2,4,4"),
                          args.seed if args.seed is not None else saved.get("seed", 1234),
                          args.max_seq_len or saved.get("max_seq_len", 512), args.batch_size,
                          args.split, saved.get("template", "auto"), args.dtype or saved.get("dtype", "fp32"))
        if args.json:
            print(json.dumps(res))
        else:
            print(f"reward model {res['model']} on {int(res['eval/pairs'])} {args.split} pairs: "
                  f"accuracy {res['accuracy']:.4f}, mean chosen score {res['chosen_score']:.4f}, "
                  f"mean rejected score {res['rejected_score']:.4f}")
        return 0

    from .data.demo import held_out_prompts

    if args.prompt:
        prompts, judged = [[{"role": "user", "content": t}] for t in args.prompt], False
    else:
        prompts, judged = held_out_prompts(args.num_prompts), True
    models = {"base": args.base} | {f"finetuned-{i + 1}" if len(args.finetuned) > 1 else "finetuned": f
                                    for i, f in enumerate(args.finetuned)}
    res = compare_models(models, prompts, judge=judged, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature)
    if args.json:
        print(json.dumps({k: {"model": v.model, "answers": v.texts, "scores": v.scores}
                          for k, v in res.items()}))
        return 0
    for i, msgs in enumerate(prompts):
        print(f"=== prompt {i + 1}: {msgs[-1]['content']}")
        for label, a in res.items():
            score = f" [judge {a.scores[i]:+.2f}]" if a.scores else ""
            print(f"  {label:>12}{score}: {a.texts[i]}")
    if judged:
        print("mean judge score: " + ", ".join(f"{k} {v.mean_score:+.3f}" for k, v in res.items()))
    sys.stdout.flush()
    return 0
