#!/usr/bin/env python
"""DeepSpeed-Chat-compatible entry point:

    python train.py --actor-model facebook/opt-1.3b --reward-model facebook/opt-350m --num-gpus 1

is the same as `chatrl train` with those flags.
"""

import sys

from chatrl.cli import main, process_start

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]], started=process_start()))
