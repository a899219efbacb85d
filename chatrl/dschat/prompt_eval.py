"""DeepSpeed-Chat's `python prompt_eval.py --model_name_or_path_baseline BASE
--model_name_or_path_finetune SFT`, as `python -m chatrl.dschat.prompt_eval ...`, which runs
`chatrl eval prompts --base BASE --finetuned SFT`: both models answer the same prompts, side by side.

Decoding is greedy, as in DeepSpeed-Chat's script (its beam, top-k and contrastive-search
variants were commented out, so --num_beams, --num_beam_groups, --top_k, --penalty_alpha and
--num_return_sequences are accepted and have no effect). --max_new_tokens keeps its default of 100.
The prompts: DeepSpeed-Chat had a fixed list per --language; chatrl uses the demo task's held-out
prompts (with judge scores), or the ones given with --prompt (repeatable); --language is accepted.
--add_eot_token is accepted and not needed (the EOS is the tokenizer's).
"""

from __future__ import annotations

import argparse
import sys


def translate(argv: list[str]) -> list[str]:
    """DeepSpeed-Chat's prompt_eval.py arguments -> `chatrl eval prompts` arguments."""
    p = argparse.ArgumentParser(prog="python -m chatrl.dschat.prompt_eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path_baseline", required=True, help="the base model")
    p.add_argument("--model_name_or_path_finetune", required=True, help="the fine-tuned model")
    p.add_argument("--max_new_tokens", type=int, default=100)
    for flag, tp in (("--num_beams", int), ("--num_beam_groups", int), ("--top_k", int),
                     ("--penalty_alpha", float), ("--num_return_sequences", int), ("--language", str)):
        p.add_argument(flag, type=tp, default=None, help="accepted; no effect (see above)")
    p.add_argument("--add_eot_token", action="store_true", help="accepted; not needed")
    args, rest = p.parse_known_args(argv)
    return ["eval", "prompts", "--base", args.model_name_or_path_baseline,
            "--finetuned", args.model_name_or_path_finetune,
            "--max-new-tokens", str(args.max_new_tokens), "--temperature", "0", *rest]


def main(argv: list[str] | None = None) -> int:
    from ..cli import main as cli_main

    return cli_main(translate(sys.argv[1:] if argv is None else list(argv)))


if __name__ == "__main__":
    sys.exit(main())
