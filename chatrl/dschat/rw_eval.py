"""DeepSpeed-Chat's `python rw_eval.py --model_name_or_path RM`, as
`python -m chatrl.dschat.rw_eval --model_name_or_path RM`, which runs `chatrl eval reward --path RM`.

DeepSpeed-Chat's script printed the scores of two fixed example pairs; chatrl reports accuracy and
the mean chosen / rejected scores on held-out pairs: by default those of the data the model was
trained on (its run_config.yaml), else the demo task; `--data_path` picks others. RM may be a
chatrl reward model or a DeepSpeed-Chat step-2 / critic folder (scored at the token DeepSpeed-Chat
scored, see chatrl/dschat/checkpoint.py). `--num_padding_at_beginning` and `--add_eot_token` are
accepted and not needed: chatrl finds the scored token from the attention mask, and the EOS a
model was trained with is the tokenizer's. Any other `chatrl eval reward` flag passes through.
"""

from __future__ import annotations

import argparse
import sys


def translate(argv: list[str]) -> list[str]:
    """DeepSpeed-Chat's rw_eval.py arguments -> `chatrl eval reward` arguments."""
    p = argparse.ArgumentParser(prog="python -m chatrl.dschat.rw_eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", "--model-name-or-path", required=True,
                   help="reward model folder (chatrl's or DeepSpeed-Chat's)")
    p.add_argument("--num_padding_at_beginning", type=int, default=None, help="accepted; not needed")
    p.add_argument("--add_eot_token", action="store_true", help="accepted; not needed")
    args, rest = p.parse_known_args(argv)
    return ["eval", "reward", "--path", args.model_name_or_path, *rest]


def main(argv: list[str] | None = None) -> int:
    from ..cli import main as cli_main

    return cli_main(translate(sys.argv[1:] if argv is None else list(argv)))


if __name__ == "__main__":
    sys.exit(main())
