"""SFT (step 1) and reward-model (step 2) training throughput, fp32 and bf16.

    python benchmarks/bench_steps.py                      # the default model, fp32 + bf16
    python benchmarks/bench_steps.py --model tiny --steps 3 --warmup 1   # a quick check

For each dtype: the machine's matmul peak (square torch.matmul, FLOPs = 2 n^3), then the model
wrapped by chatrl's DeepSpeed engine (build_engine with ZeRO stage 0 asked for, AdamW, clipping,
scheduler: what `chatrl sft` / `chatrl rm` run) trained for --warmup untimed + --steps timed
optimizer steps on fixed-shape batches of random token ids (batch x seq tokens, no padding):

    SFT step:  forward + next-token cross-entropy (sum over tokens, as chatrl.steps.sft) +
               backward + optimizer step, on [batch, seq]
    RM step:   chatrl.steps.reward.pair_scores (chosen + rejected rows in one forward, scored at the
               last token) + pairwise loss + backward + step, on [2 x batch, seq]

    tokens/s        = tokens processed (every position of every row) / time
    achieved FLOP/s = 6 x matmul_params x tokens / time
                      (2N forward + 4N backward per token; N = chatrl.engine.flops.matmul_params: all
                      parameters taking part in a matmul, the embedding lookup excluded, a tied LM
                      head counted once; attention score/value products are not counted)
    % of peak       = achieved FLOP/s / matmul peak of the same dtype
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as B  # noqa: E402  (sets the offline / CPU environment before the imports below)

import torch  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None,
                   help="model name or folder (default: the embedded SmolLM2-135M-Instruct; 'tiny' "
                        "for the 2-layer random model)")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps before timing")
    p.add_argument("--batch", type=int, default=8, help="rows (SFT) or pairs (RM) per step")
    p.add_argument("--seq", type=int, default=96, help="tokens per row")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--steps-kinds", dest="kinds", default="sft,rm", help="comma-separated: sft, rm")
    p.add_argument("--peak-sizes", default="1024,2048", help="matrix sizes of the matmul peak")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--prototypes", default="",
                   help="library changes to patch in for this run ('+'-joined; known: fused-adamw, "
                        "no-gc); compare with a run without")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/steps-<host>.json)")
    return p.parse_args(argv)


def _batches(vocab: int, batch: int, seq: int, n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # token 0 is usually <unk>/<|endoftext|>: sample ordinary ids
    return [torch.randint(3, vocab, (batch, seq), generator=g) for _ in range(n)]


def run_one(kind: str, dtype: str, path: str, tokenizer, args) -> dict:
    from chatrl.engine import ds
    from chatrl.models import load_causal_lm
    from chatrl.models.reward import RewardModel
    from chatrl.rl import pairwise_loss, sft_loss
    from chatrl.engine.flops import matmul_params, train_flops
    from chatrl.steps.reward import pair_scores

    torch.manual_seed(args.seed)
    if kind == "sft":
        model = load_causal_lm(path, dtype="fp32", tokenizer=tokenizer)
    else:
        model = RewardModel.from_pretrained(path, dtype="fp32", tokenizer=tokenizer)
    n_steps = args.warmup + args.steps
    engine = ds.build_engine(model, ds.EngineSpec(zero_stage=0, dtype=dtype, micro_batch=args.batch,
                                                  lr=1e-5, total_steps=n_steps, warmup_steps=0))
    engine.train()
    dev = engine.device
    N = matmul_params(engine.module)
    vocab = engine.module.get_input_embeddings().num_embeddings
    rows = args.batch if kind == "sft" else 2 * args.batch
    data = _batches(vocab, rows, args.seq, n_steps, args.seed)
    mask = torch.ones(rows, args.seq, dtype=torch.long, device=dev)

    def step(ids):
        ids = ids.to(dev)
        if kind == "sft":
            out = engine(input_ids=ids, attention_mask=mask, use_cache=False)
            loss = sft_loss(out.logits, ids, reduction="sum") / (rows * (args.seq - 1))
        else:
            chosen, rejected, _ = pair_scores(engine, {"input_ids": ids, "attention_mask": mask}, dev)
            loss, _ = pairwise_loss(chosen, rejected)
        engine.backward(loss)
        engine.step()
        return loss.detach()

    probes = B.Probes()
    probes.method("optimizer_step_s", engine, "step")
    times, losses, opt_times = [], [], []
    for i, ids in enumerate(data):
        probes.take()
        with B.Timer() as t:
            losses.append(float(step(ids)))
        if i >= args.warmup:
            times.append(t.s)
            opt_times.append(probes.take().get("optimizer_step_s", 0.0))
    probes.close()
    total = sum(times)
    tokens = rows * args.seq * len(times)
    flops = train_flops(N, tokens)   # 6 N tokens
    res = {"kind": kind, "dtype": dtype, "matmul_params": N, "rows_per_step": rows, "seq": args.seq,
           "steps": len(times), "seconds": total, "step_s_mean": total / len(times),
           "step_s_min": min(times), "step_s_max": max(times),
           "step_s_median": sorted(times)[len(times) // 2],
           "optimizer_step_s_mean": sum(opt_times) / len(opt_times), "tokens_per_s": tokens / total,
           "tokens_per_s_median_step": rows * args.seq / sorted(times)[len(times) // 2],
           "flops_per_s": flops / total, "loss_first": losses[0], "loss_last": losses[-1]}
    del engine, model
    import gc

    gc.collect()
    return res


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    B.quiet_libraries()
    from chatrl.engine import ds
    from chatrl.models import load_tokenizer, resolve_model_path

    ds.init_distributed()
    B.quiet_libraries()
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    for d in dtypes:
        if d not in B.DTYPES:
            raise SystemExit(f"--dtypes: {d!r} is not one of {', '.join(B.DTYPES)}")
    info = B.machine_info()
    print(f"machine: {info['cpu']} | {info['cpu_count']} cores | torch {info['torch']} with "
          f"{info['torch_threads']} threads | load average {info['loadavg_at_start']}", flush=True)

    sizes = tuple(int(s) for s in args.peak_sizes.split(","))
    peaks = {}
    for d in dtypes:
        peaks[d] = B.matmul_peak(d, sizes)
        by = ", ".join(f"n={n}: {B.fmt_flops(f)}" for n, f in peaks[d]["by_size"].items())
        print(f"matmul peak {d}: {B.fmt_flops(peaks[d]['flops'])} ({by}; {peaks[d]['threads']} threads)",
              flush=True)

    path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(path)
    print(f"model: {B.model_label(args.model)} at {path}; batch {args.batch} x seq {args.seq}, "
          f"{args.warmup} warm-up + {args.steps} timed steps"
          + (f"; prototypes patched in: {args.prototypes}" if args.prototypes else ""), flush=True)
    B.prototypes(args.prototypes)   # validate the names before the long part
    rows = []
    for d in dtypes:
        for k in kinds:
            with B.prototypes(args.prototypes):
                r = run_one(k, d, path, tokenizer, args)
            r["prototypes"] = args.prototypes
            r["peak_flops_per_s"] = peaks[d]["flops"]
            r["pct_of_peak"] = 100 * r["flops_per_s"] / peaks[d]["flops"]
            rows.append(r)
            print(f"  {k} {d}: {r['tokens_per_s']:.0f} tokens/s, {B.fmt_flops(r['flops_per_s'])} "
                  f"({r['pct_of_peak']:.1f}% of peak), {r['step_s_mean']:.3f} s/step (min {r['step_s_min']:.3f}, "
                  f"max {r['step_s_max']:.3f})", flush=True)

    print()
    print(B.table([{**r, "step": r["kind"].upper(), "tok": f"{r['tokens_per_s']:.0f}",
                    "fl": B.fmt_flops(r["flops_per_s"]), "pk": B.fmt_flops(r["peak_flops_per_s"]),
                    "pct": f"{r['pct_of_peak']:.1f}%", "sps": f"{r['step_s_mean']:.3f}",
                    "shape": f"{r['rows_per_step']}x{r['seq']}",
                    "best": f"{r['rows_per_step'] * r['seq'] / r['step_s_min']:.0f}",
                    "opt": f"{r['optimizer_step_s_mean']:.3f}"} for r in rows],
                  [("step", "step"), ("dtype", "dtype"), ("shape", "rows x seq"), ("sps", "s/step"),
                   ("opt", "of which optimizer"),
                   ("tok", "tokens/s"), ("best", "best-step tokens/s"), ("fl", "achieved"),
                   ("pk", "matmul peak"), ("pct", "% of peak")]))
    params = ", ".join(sorted({f"{r['kind']}={r['matmul_params']:,}" for r in rows}))
    print(f"achieved FLOP/s = 6 x matmul_params x tokens / time (matmul_params: {params}); "
          "best-step tokens/s = tokens of one step / fastest timed step (less sensitive to other load)")
    out = B.write_results("steps", {"machine": info, "args": vars(args), "model_path": path,
                                    "peaks": peaks, "results": rows}, args.out)
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
