"""How long `chatrl train` will take, said before step 1, and a time budget that sizes step 3.

A short probe (29 s in fp32 on a 2-core EPYC held to AVX2, 35-55 s on one such core) times the base
model on this machine in the run's precision: a training step (forward + backward + optimizer) and
a no-grad forward, giving FLOP rates, and one decode step at the rollout batch and at the report's
batch (with, for the report, one draw of Transformers' multinomial sampler at its batch). Each
step's time is then its counted work (chatrl.engine.flops, with the frozen layers of
--num-layers-unfrozen; the token counts of its own tokenized data, padded per batch as the step
pads them) divided by those rates, plus a fixed cost per step for loading and saving models.

With a budget (`chatrl train --time-budget 15m`; the cpu-default preset sets 15 minutes) the
number of PPO iterations is planned so that the whole run fits, and planned again when step 3
starts, from the time steps 1-2 really took; step 3 then also stops early if an iteration would
overrun (its `time_limit`). When fewer iterations fit than configured, the actor's learning rate
is raised (`--budget-lr-scale`, chatrl.pipeline._fit_ppo).
"""

from __future__ import annotations

import math
import random
import re
import time
from dataclasses import dataclass, field
from functools import partial

import torch

from .errors import ConfigError

# Fixed costs in seconds (model load + DeepSpeed set-up + save), measured on the 2-core CPUs
# (AVX2 fp32 and AVX512-BF16) with the embedded 135M model; a larger model scales them by size.
STEP_OVERHEAD_S = {"sft": 12.0, "rm": 12.0, "ppo": 25.0, "report": 10.0}
# Share of the time budget step 3's time limit keeps back for what the estimates miss, and the
# seconds it leaves for saving the models after the last iteration (see pipeline._fit_ppo)
RESERVE, PPO_SAVE_S = 0.07, 10.0
# Prompt tokens of the probe's decode steps: every timed generate call prefills its prompt, and
# at 32 tokens those prefills were most of the probe (53-63 s of fp32 on one core held to AVX2,
# against 32-34 s at 8, for the same decode-step times within their run-to-run spread: at this
# size a decode step's cost is its weights, not its short KV cache)
DECODE_PROMPT = 8
REPORT_DECODE_BATCH = 48  # the report generates its held-out answers in batches of this size
# Decode steps per rollout, as a fraction of --max-answer-seq-len: a batch is generated until
# all of its answers end, which at the sampling temperatures used is close to the limit.
DECODE_FRACTION = 1.0
# A PPO iteration in bf16 on a CPU ran 1.4x its estimate from the probe's rates (18.4 s measured
# against 13.1 s on an AVX512-BF16 Xeon, 2026-11-30). Since the rollout's frozen LM head no longer
# copies its weight per row (791162d) it runs at 1.04x (12.5 s against 12.1 s, the default run on
# an AVX512-BF16 EPYC, 2026-12-01). fp32 ran at 0.75x (28.6 vs 38 s) then and 0.9x (19.4-19.7 vs
# 21-22 s, AVX2-held) now, kept as is: an estimate that errs long keeps a budget safe.
PPO_ITERATION_FACTOR = {"bf16": 1.05}


def parse_duration(text: str | int | float | None) -> float | None:
    """'15m', '900', '900s', '1h30m', '1.5h' -> seconds; None, '', '0' or 'off' -> None."""
    if text is None:
        return None
    if isinstance(text, (int, float)):
        return float(text) if text > 0 else None
    s = str(text).strip().lower()
    if s in ("", "0", "off", "none"):
        return None
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", s)
    if not parts or "".join(a + b for a, b in parts) != re.sub(r"\s+", "", s):
        raise ConfigError(f"--time-budget {text!r} is not a duration; write e.g. 15m, 900, 900s, "
                          "1h30m, or off")
    total = sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)
    return total if total > 0 else None


def fmt_duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


@dataclass
class Rates:
    """What the probe measured on this machine, in the run's precision."""
    dtype: str
    train_flops_per_s: float      # forward + backward of a micro-batch (counted FLOPs / time)
    forward_flops_per_s: float    # no-grad forward of a batch
    optimizer_s_per_param: float  # AdamW step time per trained parameter
    decode_s: dict[int, float] = field(default_factory=dict)  # one decode step at batch B
    probe_s: float = 0.0
    # one rollout decode step at batch B with --rollout-weights fp16 (frozen layers through fp16
    # copies); empty: rollouts decode as decode_s
    rollout_decode_s: dict[int, float] = field(default_factory=dict)
    # --generation-backend llamacpp: converting and loading the actor's weights, once per rollout
    rollout_sync_s: float = 0.0
    # how step 3 will roll out here (engine.rlhf.resolve_generation)
    rollout_backend: str = "hf"
    rollout_weights: str = "same"
    # one draw of torch.multinomial over the vocabulary at batch B: the report samples its answers
    # through Transformers' own sampler, which draws with it at every decode step
    multinomial_s: dict[int, float] = field(default_factory=dict)
    # one decode step at the report's batch in fp32, the precision the report generates in
    # (chatrl.evaluate.generate_answers); empty: as decode_s
    report_decode_s: dict[int, float] = field(default_factory=dict)


def probe(model_path: str, dtype: str, decode_batches: tuple[int, ...], seq: int = 64,
          layers_unfrozen: int = 8, rollout_weights: tuple[str, int, int] | None = None,
          generation_backend: str = "hf", report_batch: int | None = None) -> Rates:
    """Time the base model on this machine (see the module docstring).

    report_batch: also time a decode step (and a sampler draw) at the report's batch in fp32, the
    precision the report generates in whatever the run's: in bf16 runs on an AVX512-BF16 CPU the
    report's estimate from bf16 decode rates was 1.5-2x short (73-93 s for 133-143 s).

    rollout_weights=("fp16", B, N): also time a decode step at batch B with fp16 copies of the
    layers frozen below the top N blocks, as step 3's rollouts run it (--rollout-weights fp16).
    With generation_backend="llamacpp" (where it applies): a decode step at batch B through
    llama.cpp with those rollout weights, and one rollout's weight conversion with the layers
    below the top N frozen."""
    from .engine import ds
    from .engine.flops import forward_flops, matmul_params
    from .engine.hybrid import GenerationParams, hf_generate
    from .engine.rlhf import ds_dtype, resolve_generation
    from .models import load_causal_lm
    from .models.freeze import freeze_lower_layers

    t0 = time.perf_counter()
    dev = ds.device()
    model = load_causal_lm(model_path, dtype="fp32", dropout=0.0).to(device=dev, dtype=ds_dtype(dtype))
    vocab = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    n = matmul_params(model)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def ids(b, t):
        return torch.randint(0, vocab, (b, t), generator=g).to(dev)

    def timed(fn, warm, repeats: int = 1, fastest: bool = False):
        """Seconds of fn() after a warm-up; the median of `repeats` runs (one training step
        timed once put step 3's training at 10 s and 16 s an iteration in two probes a minute
        apart on a shared 2-core VM), or the fastest."""
        warm()  # allocator, oneDNN primitive creation
        times = []
        for _ in range(repeats):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
        return min(times) if fastest else sorted(times)[len(times) // 2]

    # training: a frozen-bottom micro-batch like the default run's, through the transformer
    # only (the rate is per counted matmul FLOP; a softmax over the vocabulary at every position
    # would make it look slower than step 3's answer-only logits and value heads)
    model.train()
    freeze_lower_layers(model, layers_unfrozen)
    trunk = model.get_decoder() if hasattr(model, "get_decoder") else model
    trunk_fpt = _trunk_flops_per_token(trunk)

    def train_step(x):
        trunk(input_ids=x).last_hidden_state.float().pow(2).mean().backward()
        model.zero_grad(set_to_none=True)

    x_train, x_small = ids(8, seq), ids(2, 16)
    t_train = timed(lambda: train_step(x_train), lambda: train_step(x_small), repeats=3)
    trained = [p for p in model.parameters() if p.requires_grad]
    for p in trained:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.AdamW(trained, lr=1e-9)
    t_opt = timed(opt.step, opt.step, repeats=3)
    n_trained = sum(p.numel() for p in trained)
    del opt, trained
    model.zero_grad(set_to_none=True)
    model.requires_grad_(False)
    model.eval()

    decode = {}
    with torch.no_grad():
        x_fwd = ids(8, seq)
        t_fwd = timed(lambda: model(input_ids=x_fwd, use_cache=False),
                      lambda: model(input_ids=x_small, use_cache=False), repeats=3)

        def decode_step(b: int, generate=None, repeats: int = 1) -> float:
            """One decode step at batch b: 10 new tokens minus 2 (prefill, warm-up cancel) over 8;
            with repeats, the fastest of each (a stall only ever adds time)."""
            prompt = ids(b, DECODE_PROMPT)

            def gen(k):  # the rollout path (sampled, log-probs recorded); k new tokens, no EOS
                (generate or partial(hf_generate, model))(
                    prompt, torch.ones_like(prompt), GenerationParams(max_new_tokens=k, pad_token_id=0),
                    return_logprobs=True)

            short = timed(lambda: gen(2), lambda: gen(1), repeats, fastest=True)
            long = timed(lambda: gen(10), lambda: None, repeats, fastest=True)
            return max(long - short, 1e-6) / 8

        multinomial = {}
        for b in sorted(set(decode_batches)):
            decode[b] = decode_step(b)
            probs = torch.softmax(torch.randn(b, vocab, generator=g), -1).to(dev)
            multinomial[b] = timed(lambda: torch.multinomial(probs, 1), lambda: torch.multinomial(probs, 1))
        rollout_decode, sync_s, rollout_backend, kind = {}, 0.0, "hf", "same"
        if rollout_weights is not None:  # as step 3 will roll out (without its notes)
            rollout_backend, kind = resolve_generation(generation_backend, rollout_weights[0], dtype,
                                                       model.config, dev, quiet=True)
        if rollout_backend == "llamacpp":
            from .engine.llamacpp import LlamaCppBackend

            _, b, unfrozen = rollout_weights
            backend = LlamaCppBackend(model.config, dev, kind)
            model.requires_grad_(True)
            if unfrozen >= 0:
                freeze_lower_layers(model, unfrozen)
            backend.share(model)  # the first rollout converts every tensor, later ones the trained
            sync_s = timed(lambda: backend.share(model), lambda: None)
            rollout_decode[b] = decode_step(b, backend.generate)
            backend.release()
            del backend
        elif kind == "fp16":
            from .engine.rollout_weights import Fp16RolloutWeights

            _, b, unfrozen = rollout_weights
            if unfrozen >= 0:  # copies of the frozen layers only: none when every layer trains
                freeze_lower_layers(model.requires_grad_(True), unfrozen)
                with Fp16RolloutWeights().applied(model):
                    rollout_decode[b] = decode_step(b)
        report_decode = {}
        if report_batch:
            b = report_batch
            if b not in decode or model.dtype != torch.float32:
                model.float()
                # timed twice: the report's whole estimate (1:30-2:00 of the stand-in's 15
                # minutes) rests on this one step, and one stalled timing once put it at 2:24
                # for 1:45 taken, which step 3 lost (a 1-core AVX2-held run, seed 4)
                report_decode[b] = decode_step(b, repeats=2)
            else:
                report_decode[b] = decode[b]
            if b not in multinomial:
                probs = torch.softmax(torch.randn(b, vocab, generator=g), -1).to(dev)
                multinomial[b] = timed(lambda: torch.multinomial(probs, 1), lambda: torch.multinomial(probs, 1))
    del model
    return Rates(dtype=dtype, train_flops_per_s=trunk_fpt * x_train.numel() / t_train,
                 forward_flops_per_s=forward_flops(n, x_fwd.numel()) / t_fwd,
                 optimizer_s_per_param=t_opt / max(n_trained, 1), decode_s=decode,
                 probe_s=time.perf_counter() - t0, rollout_decode_s=rollout_decode,
                 rollout_sync_s=sync_s, rollout_backend=rollout_backend, rollout_weights=kind,
                 multinomial_s=multinomial, report_decode_s=report_decode)


def _trunk_flops_per_token(trunk) -> float:
    """Train FLOPs per token of a decoder without its LM head (get_output_embeddings is None)."""
    from .engine.flops import train_flops_per_token

    if not hasattr(trunk, "get_output_embeddings") or trunk.get_output_embeddings() is not None:
        trunk.get_output_embeddings = lambda: None
    return train_flops_per_token(trunk)


def rollout_rows(cfg) -> int:
    """The rows one rollout batch of step 3 decodes: its prompts times the answers to each (the
    batch the probe times the rollout's decode step at)."""
    return cfg.per_device_generation_batch_size * cfg.algorithm().num_generations


def decode_time(rates: Rates, batch: int, rollout: bool = False) -> float:
    """One decode step at `batch`, from the nearest measured batch (linear in between);
    `rollout`: as step 3's rollouts decode (rollout_decode_s where measured)."""
    pts = sorted((rates.rollout_decode_s if rollout and rates.rollout_decode_s else rates.decode_s).items())
    if batch <= pts[0][0] or len(pts) == 1:
        b, t = pts[0]
        return t * max(batch, 1) / b if batch > b else t
    for (b0, t0), (b1, t1) in zip(pts, pts[1:]):
        if batch <= b1:
            return t0 + (t1 - t0) * (batch - b0) / (b1 - b0)
    b, t = pts[-1]
    return t * batch / b


def padded_tokens(lengths: list[int], batch: int, epochs: int = 1, seed: int = 0,
                  max_batches: int | None = None) -> int:
    """Tokens the step computes on: each batch padded to its longest row (a seeded shuffle, as
    the steps shuffle; the exact order does not matter much for an estimate)."""
    rng, total, done = random.Random(seed), 0, 0
    for _ in range(epochs):
        order = list(lengths)
        rng.shuffle(order)
        for i in range(0, len(order) - batch + 1, batch):
            if max_batches is not None and done >= max_batches:
                return total
            total += batch * max(order[i:i + batch])
            done += 1
    return total


@dataclass
class StepEstimate:
    name: str
    seconds: float
    detail: str


def _flops_per_token(model_path: str, n_unfrozen: int,
                     reward: bool = False) -> tuple[float, float, int, float]:
    """(train FLOPs per token, forward FLOPs per token, trained parameters, forward FLOPs per token
    of the frozen blocks) of a model folder with its bottom frozen, computed on an empty
    (meta-device) copy: no weights are read."""
    from transformers import AutoModelForCausalLM

    from .engine.flops import forward_flops, matmul_params, train_flops_per_token
    from .models import load_config
    from .models.freeze import freeze_lower_layers, transformer_blocks

    config = load_config(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    if reward:  # no LM head; a one-output value head
        model = model.get_decoder() if hasattr(model, "get_decoder") else model
        model.get_output_embeddings = lambda: None
    freeze_lower_layers(model, n_unfrozen)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    blocks = list(transformer_blocks(model)) if n_unfrozen >= 0 else []
    frozen = sum(p.numel() for b in blocks[:max(0, len(blocks) - n_unfrozen)] for p in b.parameters()
                 if p.dim() >= 2)
    return (train_flops_per_token(model), forward_flops(matmul_params(model), 1), trained,
            forward_flops(frozen, 1))


class Planner:
    """Estimates of each step of a `chatrl train` plan, from probe rates and the steps' data."""

    def __init__(self, plans: dict, rates: Rates):
        self.plans, self.rates = plans, rates

    # -- data
    def _tokenized(self, name: str):
        from .steps import common
        from .steps.online import load_prompts

        cfg = self.plans[name]
        model = cfg.model_name_or_path if name in ("sft", "rm") else None
        from .models import resolve_model_path

        path = resolve_model_path(model or self.plans["sft"].model_name_or_path)
        tok = common.load_tokenizer_for(cfg, path)
        template = common.template_for(cfg, tok)
        if name == "sft":
            return common.step_datasets(cfg, tok, template, "sft", 1, cfg.max_seq_len)[:2]
        if name == "rm":
            return common.step_datasets(cfg, tok, template, "rm", 2, cfg.max_seq_len)[:2]
        return load_prompts(cfg, tok, template, name)

    def _train_time(self, tokens: int, steps: int, train_fpt: float, trained: int) -> float:
        r = self.rates
        return tokens * train_fpt / r.train_flops_per_s + steps * trained * r.optimizer_s_per_param

    # -- steps
    def sft(self) -> StepEstimate:
        return self._supervised("sft", lambda d: [len(x) for x in d["input_ids"]], pairs=False)

    def rm(self) -> StepEstimate:
        return self._supervised("rm", lambda d: [max(len(a), len(b)) for a, b in
                                                 zip(d["chosen_input_ids"], d["rejected_input_ids"])],
                                pairs=True)

    def _supervised(self, name: str, lengths_of, pairs: bool) -> StepEstimate:
        """Steps 1 and 2: optimizer steps over padded micro-batches, plus an evaluation per epoch
        (a reward model reads each pair's two answers: twice the rows)."""
        from .steps import common
        from .steps.sft import loop_spec

        cfg = self.plans[name]
        train, ev = self._tokenized(name)
        spec = loop_spec(cfg)
        steps = common.total_steps(len(train), spec, 1)
        per_epoch = max(1, len(train) // spec.global_batch(1))
        epochs = math.ceil(steps / per_epoch)
        rows = 2 if pairs else 1
        tokens = rows * padded_tokens(lengths_of(train), spec.global_batch(1), epochs=epochs,
                                      seed=cfg.seed, max_batches=steps)
        train_fpt, fwd_fpt, trained, _ = _flops_per_token(str(self._model(name)), cfg.num_layers_unfrozen,
                                                       reward=pairs)
        t = self._train_time(tokens, steps, train_fpt, trained)
        if ev is not None and len(ev):
            ev_tokens = rows * padded_tokens(lengths_of(ev), cfg.per_device_eval_batch_size,
                                             max_batches=cfg.eval_iters)
            t += epochs * ev_tokens * fwd_fpt / self.rates.forward_flops_per_s
        return StepEstimate(name, t + STEP_OVERHEAD_S[name], f"{steps} steps")

    def _model(self, name: str):
        from .models import resolve_model_path

        return resolve_model_path(self.plans[name].model_name_or_path)

    def ppo_iteration(self) -> tuple[float, str, int]:
        """(seconds per PPO iteration: rollout (prefill + decode steps), scoring forwards, updates;
        what they are; the iterations step 3 runs as configured). Follows the step's algorithm:
        G answers per prompt (each distinct prompt forwarded once in the scoring and training
        passes, stages.shared_prompt_logits), and a critic only where it has one."""
        cfg = self.plans["ppo"]
        algo = cfg.algorithm()
        G = algo.num_generations
        train, _ = self._tokenized("ppo")
        gb = cfg.per_device_generation_batch_size * cfg.generation_batches
        prompt_tokens = padded_tokens([len(x) for x in train["prompt_input_ids"]],
                                      cfg.per_device_generation_batch_size, seed=cfg.seed)
        batches = max(1, len(train) // cfg.per_device_generation_batch_size)
        P = prompt_tokens / batches / cfg.per_device_generation_batch_size  # padded prompt length
        A = cfg.max_answer_seq_len
        actor_path = str(self._model("sft"))
        critic_path = str(self._model("rm"))
        a_train, a_fwd, a_trained, a_frozen = _flops_per_token(actor_path, cfg.actor_num_layers_unfrozen)
        c_train, c_fwd, c_trained, c_frozen = _flops_per_token(critic_path, cfg.critic_num_layers_unfrozen,
                                                               reward=True)
        if not algo.uses_critic:
            c_train = c_trained = c_frozen = 0
        c_score, a_score = c_fwd * (2 if algo.uses_critic else 1), a_fwd  # reward model (+ critic)
        r = self.rates
        # the frozen blocks run once per rollout (chatrl.engine.trunk); not with G answers per prompt
        if cfg.share_frozen_trunk and G == 1:
            a_train, c_train, c_score = a_train - a_frozen, c_train - c_frozen, c_score - c_frozen
            from .engine.trunk import rollout_records_trunk

            if rollout_records_trunk(r.dtype, r.rollout_weights, r.rollout_backend):
                a_score -= a_frozen  # the rollout records the actor's trunk: the reference skips it
        rollouts, answers = gb * G, gb * G * A * DECODE_FRACTION
        seq_tokens = rollouts * P + answers   # every row forwarded whole (reward model, critic)
        shared = gb * P + answers             # the actor's and reference's passes: prompts once
        # Transformers rollouts prefill each distinct prompt once (models.load.shared_prefix)
        prefill_rows = gb if G > 1 and r.rollout_backend == "hf" else rollouts
        t_gen = (prefill_rows * P * a_fwd / r.forward_flops_per_s
                 + cfg.generation_batches * (A * DECODE_FRACTION
                                             * decode_time(r, rollout_rows(cfg), rollout=True)
                                             + r.rollout_sync_s))
        t_score = (seq_tokens * c_score + shared * a_score) / r.forward_flops_per_s
        opt_steps = cfg.ppo_epochs * max(1, rollouts // cfg.per_device_training_batch_size) // cfg.gradient_accumulation_steps
        t_train = (cfg.ppo_epochs * (shared * a_train + seq_tokens * c_train) / r.train_flops_per_s
                   + opt_steps * (a_trained + c_trained) * r.optimizer_s_per_param)
        factor = PPO_ITERATION_FACTOR.get(r.dtype, 1.0) if not torch.cuda.is_available() else 1.0
        t_gen, t_score, t_train = (factor * t for t in (t_gen, t_score, t_train))
        total = t_gen + t_score + t_train
        from .steps.ppo import iterations_per_epoch

        n = iterations_per_epoch(len(train), cfg, 1) * cfg.num_train_epochs
        n = min(n, cfg.max_steps) if cfg.max_steps > 0 else n
        return total, f"generate {t_gen:.0f}s + score {t_score:.0f}s + train {t_train:.0f}s", n

    def report(self, n_prompts: int, max_new_tokens: int = 48, models: int = 3) -> float:
        """`models` models (base, SFT, RLHF; or SFT and RLHF) each answer the report's held-out
        prompts in batches: a prefill of each batch's prompts (padded to its longest), then decode
        steps, each with a draw of Transformers' sampler."""
        r, b = self.rates, min(n_prompts, REPORT_DECODE_BATCH)
        lengths = self._report_prompt_lengths(n_prompts)
        batches = [lengths[i:i + b] for i in range(0, len(lengths), b)]
        prefill = sum(len(x) * max(x) for x in batches)
        fwd = _flops_per_token(str(self._model("sft")), -1)[1]
        step = r.report_decode_s.get(b) or decode_time(r, b)
        step += r.multinomial_s.get(b, 0.0)
        per_model = prefill * fwd / r.forward_flops_per_s + len(batches) * max_new_tokens * step
        return models * per_model + STEP_OVERHEAD_S["report"]

    def _report_prompt_lengths(self, n_prompts: int) -> list[int]:
        """Token counts of the report's held-out prompts, rendered as the report renders them."""
        from .data.templates import render_prompt
        from .evaluate import model_template
        from .models import load_tokenizer
        from .report import _report_prompts

        path = str(self._model("sft"))
        tok = load_tokenizer(path, padding_side="left")
        template = model_template(path, tok, "auto")
        prompts, _ = _report_prompts(self.plans, n_prompts)
        return [len(tok(render_prompt(tok, m, template), add_special_tokens=template == "plain")["input_ids"])
                for m in prompts] or [1]


def ppo_time_limit(room: float, budget: float) -> float:
    """Step 3's time limit from the `room` seconds the budget leaves it (the report's already
    taken out): ~10 s for saving the models after the last iteration, and 7% of the budget for
    what the estimate of the report and the step start-ups misses (measured on 15-minute budgets:
    with no reserve a run ended 13 s past it; with 5%, one ended 1 s short of it by the wall
    clock, on a machine running slower than its probe)."""
    return room - PPO_SAVE_S - RESERVE * budget


def fit_iterations(room: float, per_iteration: float, configured: int) -> int:
    """PPO iterations (at least 1, at most `configured`) that fit in `room` seconds, step 3's
    start-up included."""
    return max(1, min(configured, int((room - STEP_OVERHEAD_S["ppo"]) // per_iteration)))


def report_with_base(mode: str, room: float, per_iteration: float, configured: int,
                     report_all: float, report_two: float) -> bool:
    """Whether the report also answers with the base model (`--report-base`): "on", "off", or
    "auto": yes where every configured PPO iteration fits in the `room` seconds left for step 3
    and the report with it, or where leaving it out would not fit one more iteration. Leaving it
    out saves a third of the report (~55 s on a CPU half as fast as a 2-core AVX2 one, where an
    iteration takes 27-37 s)."""
    if mode != "auto":
        return mode == "on"
    return fit_iterations(room - report_all, per_iteration, configured) >= configured \
        or fit_iterations(room - report_two, per_iteration, configured) <= fit_iterations(
            room - report_all, per_iteration, configured)


def budget_for_all(plan: dict, probe_s: float = 0.0) -> int:
    """Seconds, in whole minutes, of a time budget whose step-3 time limit (pipeline._fit_ppo:
    what is left after the probe, steps 1-2 and the report, less the save and the reserve) holds
    every configured PPO iteration of `plan` (plan_train's result), at the estimated rates. The
    report is the one such a budget runs (with the base model's answers unless --report-base off)."""
    need = (probe_s + sum(v for k, v in plan["steps"].items() if k != "ppo") + plan["report_full"]
            + STEP_OVERHEAD_S["ppo"] + PPO_SAVE_S + plan["configured"] * plan["per_iteration"])
    return int(math.ceil(need / (1.0 - RESERVE) / 60.0)) * 60


def plan_train(plans: dict, rates: Rates, wanted: list[str], report_prompts: int | None,
               budget: float | None, planned_ppo: int | None = None, report_base: str = "auto",
               elapsed: float = 0.0) -> dict:
    """Estimates of the wanted steps and, with a budget, the PPO iteration count that fits it
    (`planned_ppo`: a count already fixed, e.g. by an interrupted run being resumed), and whether
    the report answers with the base model too (`report_base`: see report_with_base). `elapsed`:
    the budget's seconds already spent (start-up and the probe).

    With a budget, step 3's estimate is at most the time limit it will get if steps 1-2 take
    their estimates (pipeline._fit_ppo: the save and the reserve kept back): step 3 stops there.
    Counted without them, the estimate printed on a 2-core AVX2-only EPYC was 14:28 where the
    steps and report took 11:40 (24% over): step 3 ran 10 iterations to its 277-s limit.

    Returns {"steps": {step: seconds}, "per_iteration", "ppo_iters" (fitted without the reserve, as
    _fit_ppo fits them), "ppo_shown" (those that fit in the time limit), "configured", "report" (the
    planned report's seconds), "report_all" / "report_two" (with / without the base model),
    "report_full" (the report of a budget that holds every iteration), "report_base", "text"}."""
    pl = Planner(plans, rates)
    est: dict[str, float] = {}
    lines = []
    for name, label in (("sft", "step 1 sft"), ("rm", "step 2 rm")):
        if name in wanted:
            e = getattr(pl, name)()
            est[name] = e.seconds
            lines.append(f"{label} ~{fmt_duration(e.seconds)} ({e.detail})")
    out = {"steps": est, "per_iteration": None, "ppo_iters": None, "ppo_shown": None, "report": 0.0,
           "report_all": 0.0, "report_two": 0.0, "report_full": 0.0, "report_base": report_base != "off"}
    configured = None
    if "ppo" in wanted:
        per_iter, detail, configured = pl.ppo_iteration()
        n_iters = planned_ppo or configured
        rep_all = pl.report(report_prompts) if report_prompts else 0.0
        rep_two = pl.report(report_prompts, models=2) if report_prompts else 0.0
        with_base = report_base != "off"
        limit = None
        if budget is not None:
            room = budget - elapsed - sum(est.values())
            if planned_ppo is None:  # a resumed run keeps its count, and auto keeps the base
                with_base = report_with_base(report_base, room, per_iter, configured, rep_all, rep_two)
            room -= rep_all if with_base else rep_two
            if planned_ppo is None:
                n_iters = fit_iterations(room, per_iter, configured)
            limit = ppo_time_limit(room, budget)
        rep = rep_all if with_base else rep_two
        est["ppo"] = STEP_OVERHEAD_S["ppo"] + n_iters * per_iter
        capped = limit is not None and est["ppo"] > limit
        shown = n_iters  # the iterations that fit in the limit
        if capped:
            est["ppo"] = max(limit, STEP_OVERHEAD_S["ppo"] + per_iter)
            shown = min(n_iters, fit_iterations(limit, per_iter, configured))
        lines.append(f"step 3 ppo ~{fmt_duration(est['ppo'])} ({'to its time limit: ' * capped}"
                     f"{shown} iteration{'s' * (shown != 1)} x ~{per_iter:.0f}s: {detail})")
        if rep:
            lines.append(f"report ~{fmt_duration(rep)}" + ("" if with_base or report_base == "off" else
                         " (SFT and RLHF answers; the base model's left out to give step 3 the time: "
                         "--report-base on keeps them)"))
        out.update(per_iteration=per_iter, ppo_iters=n_iters, ppo_shown=shown, report=rep,
                   configured=configured,
                   report_all=rep_all, report_two=rep_two, report_base=with_base,
                   report_full=rep_two if report_base == "off" else rep_all)
    total = sum(est.values()) + out["report"]
    head = (f"estimated time ~{fmt_duration(total)} ({rates.dtype}; this machine measured in "
            f"{rates.probe_s:.0f}s)" + (f"; time budget {fmt_duration(budget)}" if budget else ""))
    if configured is not None and out["ppo_shown"] < configured:
        head += (f": PPO planned at {out['ppo_shown']} of its {configured} iterations to fit (all "
                 f"{configured}: --time-budget {budget_for_all(out, rates.probe_s) // 60}m)")
    out["text"] = head + "\n  " + "\n  ".join(lines)
    return out
