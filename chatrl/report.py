"""The end-of-`train` report: report.md plus PNG plots in <output>/plots/.

Plots: SFT loss, RM loss and accuracy, PPO reward / KL / answer length per iteration, and the
time split of step 3. A table compares the answers of the base, SFT and RLHF models to the same
held-out prompts (the demo task's, scored by its judge; otherwise the user's own eval prompts).
"""

from __future__ import annotations

import json
from pathlib import Path

from .logging import read_metrics


def _series(rows: list[dict], key: str, kind: str = "train") -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in rows if r.get("kind") == kind and key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def _smooth(ys: list[float], k: int = 5) -> list[float]:
    out = []
    for i in range(len(ys)):
        w = ys[max(0, i - k + 1):i + 1]
        out.append(sum(w) / len(w))
    return out


def make_plots(step_dirs: dict[str, Path], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    files = []
    sft, rm, ppo = (read_metrics(step_dirs[k]) for k in ("sft", "rm", "ppo"))

    def save(fig, name):
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)

    if sft:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        x, y = _series(sft, "loss")
        ax.plot(x, y, alpha=0.35, label="train loss")
        ax.plot(x, _smooth(y), label="train loss (smoothed)")
        ex, ey = _series(sft, "eval/loss", "eval")
        if ex:
            ax.plot(ex, ey, "o-", label="eval loss")
        ax.set(title="Step 1 - SFT loss", xlabel="optimizer step", ylabel="cross-entropy")
        ax.legend()
        save(fig, "sft_loss.png")
    if rm:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))
        x, y = _series(rm, "loss")
        a1.plot(x, y, alpha=0.35, label="train loss")
        a1.plot(x, _smooth(y), label="smoothed")
        a1.set(title="Step 2 - reward model loss", xlabel="optimizer step", ylabel="-log sigmoid(margin)")
        a1.legend()
        x, y = _series(rm, "accuracy")
        a2.plot(x, _smooth(y), label="train accuracy (smoothed)")
        ex, ey = _series(rm, "accuracy", "eval")
        if ex:
            a2.plot(ex, ey, "o-", label="held-out accuracy")
        a2.set(title="Step 2 - accuracy", xlabel="optimizer step", ylim=(0, 1.05))
        a2.legend()
        save(fig, "rm_loss_accuracy.png")
    if ppo:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
        for ax, key, title in zip(axes, ("reward/score", "policy/kl", "response/length"),
                                  ("reward score", "KL to reference (per answer)", "answer length (tokens)")):
            x, y = _series(ppo, key)
            ax.plot(x, y, alpha=0.35)
            ax.plot(x, _smooth(y))
            ax.set(title=f"Step 3 - {title}", xlabel="PPO iteration")
        save(fig, "ppo_reward_kl_length.png")
        fig, ax = plt.subplots(figsize=(6, 3.5))
        parts = {k: sum(r.get(f"time/{k}", 0.0) for r in ppo if r.get("kind") == "train")
                 for k in ("generate", "score", "train")}
        total = sum(r.get("time/iteration", 0.0) for r in ppo if r.get("kind") == "train")
        parts["other"] = max(total - sum(parts.values()), 0.0)
        ax.bar(list(parts), list(parts.values()), color=["#4c72b0", "#dd8452", "#55a868", "#8c8c8c"])
        for i, v in enumerate(parts.values()):
            ax.text(i, v, f"{v:.0f}s\n{100 * v / max(total, 1e-9):.0f}%", ha="center", va="bottom")
        ax.set(title="Step 3 - where the time went", ylabel="seconds")
        save(fig, "ppo_time_split.png")
    return files


def _last(rows: list[dict], key: str, kind: str = "eval"):
    vals = [r[key] for r in rows if r.get("kind") == kind and key in r]
    return vals[-1] if vals else None


def _report_prompts(plans: dict, n: int) -> tuple[list[list[dict]], bool]:
    """Held-out prompts: the demo task's (judged) when the run used it, else the user's eval rows."""
    from .data import build_step_data
    from .data.demo import held_out_prompts

    cfg = plans["ppo"]
    if "demo" in cfg.data_path:
        return held_out_prompts(n), True
    raw = build_step_data(list(cfg.data_path), cfg.data_split, 3, seed=cfg.seed)
    return [list(raw.eval[i]["messages"]) for i in range(min(n, len(raw.eval)))], False


def paired_gain(before: list[float] | None, after: list[float] | None) -> tuple[float, float] | None:
    """Mean of after - before over the same prompts, and its standard error."""
    if not before or not after or len(before) != len(after) or len(before) < 2:
        return None
    d = [b - a for a, b in zip(before, after)]
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / (len(d) - 1)
    return mean, (var / len(d)) ** 0.5


def write_report(root: Path, plans: dict, timings: dict, n_prompts: int = 96,
                 max_new_tokens: int = 48, temperature: float = 0.7, seed: int = 0,
                 with_base: bool = True) -> Path:
    """with_base False: only the SFT and RLHF models answer (chatrl train --report-base: a time
    budget too short for every PPO iteration gives step 3 the base model's third)."""
    from .evaluate import compare_models
    from .models import read_meta

    dirs = {k: Path(plans[k].output_dir) for k in ("sft", "rm", "ppo")}
    plots = make_plots(dirs, root / "plots")
    sft_rows, rm_rows, ppo_rows = (read_metrics(dirs[k]) for k in ("sft", "rm", "ppo"))

    prompts, judged = _report_prompts(plans, n_prompts)
    base = read_meta(dirs["sft"] / "model").get("base_model") or plans["sft"].model_name_or_path
    models = {"base": base, "SFT": str(dirs["sft"] / "model"), "RLHF": str(dirs["ppo"] / "actor")}
    if not with_base:
        del models["base"]
    from .budget import REPORT_DECODE_BATCH

    res = compare_models(models, prompts, judge=judged, max_new_tokens=max_new_tokens,
                         temperature=temperature, seed=seed, batch_size=REPORT_DECODE_BATCH)

    lines = ["# chatrl training report", ""]
    lines += ["## Results", ""]
    if judged:
        lines += [f"Mean demo-judge score over {len(prompts)} held-out prompts (sampled answers, "
                  f"temperature {temperature}, seed {seed}; judge range about -0.75 to 1):", "",
                  "| model | judge score |", "|---|---|"]
        lines += [f"| {k} | {v.mean_score:+.3f} |" for k, v in res.items()]
        lines.append("")
    if not with_base:
        lines += [f"The base model (`{base}`) did not answer: the time budget could not hold every "
                  "PPO iteration and its answers too (`chatrl train --report-base on` keeps them; "
                  f"`chatrl eval prompts --base {base} --finetuned {models['RLHF']}` compares it).", ""]
    if judged:
        gain = paired_gain(res["SFT"].scores, res["RLHF"].scores)
        if gain is not None:
            lines += [f"RLHF - SFT: {gain[0]:+.3f}, standard error {gain[1]:.3f} (the same prompts, "
                      "paired; a gain under about twice its standard error may be noise)", ""]
    ppl = _last(sft_rows, "perplexity")
    acc = _last(rm_rows, "accuracy")
    train_ppo = [r for r in ppo_rows if r.get("kind") == "train"]
    if ppl is not None:
        lines.append(f"- SFT held-out perplexity: {ppl:.3f}")
    if acc is not None:
        lines.append(f"- Reward model held-out accuracy: {acc:.3f} (mean chosen score "
                     f"{_last(rm_rows, 'chosen_score'):+.3f}, rejected {_last(rm_rows, 'rejected_score'):+.3f})")
    if train_ppo:
        k = max(1, len(train_ppo) // 5)
        first = sum(r["reward/score"] for r in train_ppo[:k]) / k
        last = sum(r["reward/score"] for r in train_ppo[-k:]) / k
        kl = sum(r["policy/kl"] for r in train_ppo[-k:]) / k
        lines.append(f"- PPO reward score: {first:+.3f} (mean of the first {k} iteration(s)) -> "
                     f"{last:+.3f} (last {k}); "
                     f"KL to the reference at the end {kl:.3f}; {len(train_ppo)} iterations")
        sps = sum(r["perf/samples_per_s"] for r in train_ppo) / len(train_ppo)
        lines.append(f"- PPO throughput: {sps:.3f} samples/s")
    if timings:
        lines.append("- Step wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    lines += ["", "## Plots", ""]
    lines += [f"![{p.stem}](plots/{p.name})" for p in plots]
    lines += ["", "## Answers to held-out prompts", ""]
    header = "| prompt | " + " | ".join(res) + " |"
    lines += [header, "|" + "---|" * (len(res) + 1)]

    def cell(text: str, score) -> str:
        t = text.replace("|", "\\|").replace("\n", " ")
        return t + (f" **[{score:+.2f}]**" if score is not None else "")

    for i, msgs in enumerate(prompts[:10]):
        row = [msgs[-1]["content"].replace("|", "\\|")]
        row += [cell(a.texts[i], a.scores[i] if a.scores else None) for a in res.values()]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Models: " + ", ".join(f"{k} = `{v.model}`" for k, v in res.items()), ""]
    path = root / "report.md"
    path.write_text("\n".join(lines) + "\n")
    (root / "report.json").write_text(json.dumps(
        {k: {"model": v.model, "judge_mean": v.mean_score, "answers": v.texts, "scores": v.scores}
         for k, v in res.items()}, indent=1))
    return path
