"""DeepSpeed-Chat's `python chat.py --path <actor> --max_new_tokens 128`, as
`python -m chatrl.dschat.chat --path <actor> --max_new_tokens 128`.

It is `chatrl chat` (same flags: --temperature, --template, --system...), and also takes
DeepSpeed-Chat's chatbot words: `quit` leaves and `clear` starts a new conversation (chatrl's
/quit and /reset work too). The conversation format is the one recorded with the model, else its
tokenizer's chat template, else DeepSpeed-Chat's `Human: ... Assistant:` turns.
"""

from __future__ import annotations

import argparse
import sys

ALIASES = {"quit": "/quit", "clear": "/reset"}


def main(argv: list[str] | None = None) -> int:
    from ..cli import _quiet_libraries, guarded
    from ..serve.chat import add_chat_args, chat_main

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = add_chat_args(argparse.ArgumentParser(prog="python -m chatrl.dschat.chat",
                                                   description=__doc__))
    args = parser.parse_args(argv)
    _quiet_libraries()
    return guarded(lambda: chat_main(args, aliases=ALIASES))


if __name__ == "__main__":
    sys.exit(main())
