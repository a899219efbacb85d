"""Greedy generation through chatrl's HybridEngine, for tests/e2e/test_hybrid.py.

    deepspeed --num_gpus 2 hybrid_generate.py --out DIR --zero-stage 3   (gather-once and per-token)
    python hybrid_generate.py --out DIR --zero-stage 0                   (1-rank reference)

Variants: tiny-llama (GQA 4/2 heads), tiny-qwen2 (1 kv head), tiny-llama with LoRA adapters whose B
weights are random and non-zero; under ZeRO-3 also tiny-llama with and without LoRA decoded by
llama.cpp (`<variant>@llamacpp`, where llama-cpp-python is installed). Rank r of a W-rank run generates batch r of BATCHES; a 1-rank run
generates every batch, one batch at a time (the same padding as the multi-rank run). The batches
differ in prompt lengths and in max_new_tokens, so one rank finishes generating well before the
other. Writes DIR/rank<r>.json: {"<variant>/<mode>/<batch>": {"tokens", "logprobs", ...}}.
"""

import argparse
import json
import time
from pathlib import Path

import torch

BATCHES = [
    # (prompts, max_new_tokens): the first batch has long prompts and long answers ...
    (["Tell me about the ocean, the rain and the mountains in the morning sun.",
      "Describe a mountain.",
      "What do you think of rain? Numbers 0 1 2 3 4 5 6 7 8 9"], 8),
    # ... the second short prompts and answers: its rank finishes first.
    (["Hi", "Rain is lovely"], 2),
]
# (model, LoRA, also per-token ZeRO-3 gathering): per-token gathering is slow on CPU (one
# all-gather per layer per token), so tiny-qwen2 runs gather-once only.
VARIANTS = [("tiny-llama", False, True), ("tiny-qwen2", False, False), ("tiny-llama", True, True)]
# --generation-backend llamacpp (where llama-cpp-python is installed): under ZeRO-3 each rank
# converts the gathered weights (LoRA folded in) and decodes its own batch with llama.cpp
LLAMACPP_VARIANTS = [("tiny-llama", False), ("tiny-llama", True)]


def sharpen(model, seed: int) -> None:
    """Re-draw the matrices with a large std: a random tiny model's greedy answers are otherwise
    one token repeated, which would hide a wrong weight; sharp random weights give varied tokens."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.25)


def lora_randomize(model, seed: int) -> None:
    """Non-zero LoRA B weights (PEFT starts them at 0) and A weights drawn from our own generator
    (PEFT draws them from the global RNG, whose state differs between processes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--zero-stage", type=int, default=0)
    ap.add_argument("--local_rank", type=int, default=-1)
    args = ap.parse_args()

    from chatrl.engine import ds, llamacpp
    from chatrl.engine.hybrid import GenerationParams, HybridEngine
    from chatrl.models import load_causal_lm, load_tokenizer, resolve_model_path
    from chatrl.models.lora import apply_lora

    ds.init_distributed()
    rank, world = ds.rank(), ds.world_size()
    batches = [rank] if world > 1 else list(range(len(BATCHES)))
    result = {}
    runs = [(name, lora, per_token, "hf") for name, lora, per_token in VARIANTS]
    if args.zero_stage == 3 and llamacpp.available():
        runs += [(name, lora, False, "llamacpp") for name, lora in LLAMACPP_VARIANTS]
    for name, lora, per_token, backend in runs:
        path = resolve_model_path(name)
        tok = load_tokenizer(path, padding_side="left")
        model = load_causal_lm(path, dtype="fp32", dropout=0.0, tokenizer=tok)
        sharpen(model, 1)
        if lora:
            model = apply_lora(model, 4)
            lora_randomize(model, 7)
        engine = ds.build_engine(model, ds.EngineSpec(zero_stage=args.zero_stage, micro_batch=1))
        assert ds.is_zero3(engine.module) == (args.zero_stage == 3)
        for gather_once in ((True, False) if args.zero_stage == 3 and per_token else (True,)):
            hybrid = HybridEngine(engine, gather_once=gather_once, backend=backend)
            for b in batches:
                prompts, n_new = BATCHES[b]
                enc = tok(prompts, return_tensors="pt", padding=True)
                params = GenerationParams(max_new_tokens=n_new, temperature=0.0,
                                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
                engine.train()
                t0 = time.time()
                gen = hybrid.generate(enc["input_ids"], enc["attention_mask"], params,
                                      return_logprobs=True)
                P = enc["input_ids"].shape[1]
                key = (f"{name}{'+lora' if lora else ''}{'@llamacpp' if backend != 'hf' else ''}/"
                       f"{'once' if gather_once else 'per-token'}/{b}")
                result[key] = {"tokens": gen.sequences[:, P:].tolist(), "logprobs": gen.logprobs.tolist(),
                               "prompt": gen.sequences[:, :P].tolist(), "input": enc["input_ids"].tolist(),
                               "seconds": time.time() - t0, "training_after": engine.module.training}
    ds.barrier()  # every rank got here: nobody hung in generation
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
