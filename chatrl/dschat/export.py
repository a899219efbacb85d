"""`chatrl export --format dschat --path MODEL --output-dir DIR`: a chatrl model folder written in
DeepSpeed-Chat's layout (pytorch_model.bin + config.json + tokenizer), for users who go back.

A reward model becomes DeepSpeed-Chat's RewardModel state dict (rwtransformer.* + v_head.weight),
loadable as `--critic_model_name_or_path` of its step 3 and by its rw_eval.py; a causal LM keeps
its Hugging Face names (`--actor_model_name_or_path`, chat.py). See checkpoint.export_dschat.
"""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chatrl export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", required=True, choices=("dschat",),
                   help="dschat: DeepSpeed-Chat's pytorch_model.bin layout")
    p.add_argument("--path", "--model_name_or_path", "--model-name-or-path", dest="path", required=True,
                   help="chatrl model folder (a step's output folder or its model/ subfolder)")
    p.add_argument("--output-dir", "--output_dir", dest="output_dir", required=True,
                   help="folder to write (replaced atomically if it exists)")
    return p


def export_main(argv: list[str]) -> int:
    from .checkpoint import export_dschat

    args = build_parser().parse_args(argv)
    res = export_dschat(args.path, args.output_dir)
    what = "reward model (rwtransformer.* + v_head.weight)" if res["kind"] == "reward_model" else "causal LM"
    print(f"exported {what} to {res['path']} in DeepSpeed-Chat's layout: pytorch_model.bin "
          f"({res['tensors']} tensors, embeddings padded to {res['vocab_rows']} rows), config.json, "
          "tokenizer")
    return 0
