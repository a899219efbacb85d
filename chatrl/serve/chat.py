"""`chatrl chat --path <model>`: a multi-turn conversation with a model in the terminal.

Each turn, the whole conversation so far is rendered in the model's format and the answer is
streamed as it is generated. Commands: /reset clears the history, /quit (or end of input,
or Ctrl-C) leaves. Input may be piped: one line is one user turn.

DeepSpeed-Chat's `chat.py --path <actor> --max_new_tokens 128` works as is.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from contextlib import contextmanager
from typing import Callable, TextIO

from ..errors import ChatRLError
from .choose import announce, default_model_path, display_name
from .generation import ChatModel, check_sampling

HELP = "Commands: /reset clears the conversation, /quit leaves (so do Ctrl-D and Ctrl-C)."


def add_generation_args(parser: argparse.ArgumentParser, max_new_tokens: int = 128,
                        several: bool = False) -> None:
    """Flags shared by chat and serve: which model, how to load it, how to decode.
    several: --path may be repeated (serve)."""
    parser.add_argument("--path", "--model", "--model_name_or_path", dest="path", default=None,
                        action="append" if several else "store",
                        help="model folder (e.g. the actor saved by `chatrl train`), a .gguf file, "
                             "a hub id, or 'tiny' for a tiny random test model"
                             + ("; repeat it to serve several models" if several else "")
                             + ". Default: the newest model `chatrl train` wrote under ./output, "
                               "else the embedded default model")
    parser.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=int,
                        default=max_new_tokens, help=f"longest answer in tokens (default {max_new_tokens})")
    parser.add_argument("--temperature", type=float, default=0.7,
                        help="sampling temperature; 0 = greedy (default 0.7)")
    parser.add_argument("--top-p", "--top_p", dest="top_p", type=float, default=0.9,
                        help="nucleus sampling mass (default 0.9)")
    parser.add_argument("--template", choices=("auto", "chat", "plain"), default="auto",
                        help="conversation format; auto = the one recorded with the model (chatrl.json), "
                             "else the tokenizer's chat template, else plain Human:/Assistant:")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="weights' dtype (default fp32)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda if available)")


def add_chat_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add `chatrl chat`'s flags to `parser` (a subcommand parser); returns it."""
    add_generation_args(parser)
    parser.add_argument("--system", default=None, help="a system message that opens every conversation")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    parser.add_argument("--show-prompt", "--show_prompt", dest="show_prompt", action="store_true",
                        help="print the exact text the model sees each turn (to stderr)")
    return parser


def run_chat(path: str | ChatModel, max_new_tokens: int = 128, temperature: float = 0.7,
             top_p: float = 0.9, template: str = "auto", input_stream: TextIO = sys.stdin,
             output_stream: TextIO = sys.stdout, *, dtype: str = "fp32", device: str | None = None,
             system: str | None = None, seed: int | None = None,
             on_prompt: Callable[[str], None] | None = None,
             aliases: dict[str, str] | None = None) -> int:
    """Chat until /quit, end of input or Ctrl-C; returns the exit code (0).

    path: a model folder/name, or an already loaded ChatModel.
    on_prompt: called with the rendered prompt before each answer (tests, --show-prompt).
    aliases: whole input lines read as commands, e.g. {"quit": "/quit"} (DeepSpeed-Chat's words).
    Bad settings raise ChatRLError before the model loads.
    """
    check_sampling(max_new_tokens, temperature, top_p)
    # A real terminal on both ends: prompt with input() (line editing); else read lines and
    # echo them, so a piped transcript reads like a conversation.
    interactive = (input_stream is sys.stdin and output_stream is sys.stdout
                   and input_stream.isatty() and output_stream.isatty())
    opening = [{"role": "system", "content": system}] if system else []
    history = list(opening)
    # Bytes that are not UTF-8 must not end the conversation: decode them as lone surrogates
    # (surrogateescape) and skip those lines below with a warning.
    if hasattr(input_stream, "reconfigure") and getattr(input_stream, "errors", "strict") == "strict":
        input_stream.reconfigure(errors="surrogateescape")
    line_no = 0

    def say(text: str = "", end: str = "\n") -> None:
        output_stream.write(text + end)
        output_stream.flush()

    def read_line() -> str | None:
        if interactive:
            try:
                return input("\nYou: ")
            except EOFError:
                return None
        line = input_stream.readline()
        return line if line else None

    try:
        model = path if isinstance(path, ChatModel) else load_for_chat(
            path, dtype=dtype, template=template, device=device)
        say(f"Chatting with {model.name} ({model.template} format). {HELP}")
        while True:
            line = read_line()
            if line is None:  # end of input (Ctrl-D, or the end of a pipe)
                break
            line_no += 1
            if has_surrogates(line):
                sys.stderr.write(f"warning: input line {line_no} is not valid UTF-8 text; skipped "
                                 "(the conversation goes on)\n")
                sys.stderr.flush()
                continue
            text = line.strip()
            if not text:
                continue
            text = (aliases or {}).get(text, text)
            if text in ("/quit", "/exit"):
                break
            if text == "/reset":
                history = list(opening)
                say("(conversation cleared)")
                continue
            if text == "/help":
                say(HELP)
                continue
            if not interactive:
                say(f"You: {text}")
            history.append({"role": "user", "content": text})
            try:
                pieces = model.stream(history, max_new_tokens=max_new_tokens, temperature=temperature,
                                      top_p=top_p, seed=seed)
            except ChatRLError as e:  # e.g. the conversation outgrew the model's context
                history.pop()
                say(f"(error: {e})")
                continue
            if on_prompt is not None:
                on_prompt(model.render(history))
            say("Assistant: ", end="")
            answer = []
            for piece in pieces:  # print each piece as soon as it is generated
                say(piece, end="")
                answer.append(piece)
            say()
            history.append({"role": "assistant", "content": "".join(answer)})
    except KeyboardInterrupt:  # Ctrl-C: leave cleanly, whatever we were doing
        say()
    say("Goodbye.")
    return 0


def has_surrogates(text: str) -> bool:
    """True if `text` holds lone surrogates: undecodable input bytes (surrogateescape) or a JSON
    "\\ud800" escape. They are not text and no tokenizer can encode them."""
    return any("\ud800" <= ch <= "\udfff" for ch in text)


def chat_main(args: argparse.Namespace, aliases: dict[str, str] | None = None) -> int:
    """Run `chatrl chat` from parsed `add_chat_args` flags; returns the exit code."""
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)  # imported by Transformers; not chat news
    path = args.path
    if path is None:
        path, why = default_model_path()
        announce(f"No --path given: using {why}.")
    on_prompt = None
    if args.show_prompt:
        def on_prompt(prompt: str) -> None:
            sys.stderr.write(f"--- prompt ---\n{prompt}\n--- end prompt ---\n")
            sys.stderr.flush()
    with held_warnings():
        return run_chat(path, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_p=args.top_p, template=args.template, dtype=args.dtype, device=args.device,
                        system=args.system, seed=args.seed, on_prompt=on_prompt, aliases=aliases)


def load_for_chat(path: str, **kwargs) -> ChatModel:
    """Load a model, saying so first: a big model takes a while and the terminal must not look
    dead (the line goes to stderr, so a piped transcript stays the conversation alone)."""
    announce(f"Loading model {path!r} ...")
    model = ChatModel.load(path, **kwargs)
    model.name = display_name(path)
    return model


@contextmanager
def held_warnings(stream: TextIO = sys.stderr):
    """Keep Python warnings (libraries' deprecation notices...) out of the conversation: hold
    them, and print each distinct one once when the chat ends."""
    held: dict[str, None] = {}
    shown = warnings.showwarning

    def hold(message, category, filename, lineno, file=None, line=None):
        held[f"{category.__name__}: {message} ({os.path.basename(filename)}:{lineno})"] = None

    warnings.showwarning = hold
    try:
        yield
    finally:
        warnings.showwarning = shown
        if held:
            stream.write(f"({len(held)} library warning{'s' * (len(held) > 1)} held back during the chat:)\n"
                         + "".join(f"  {w}\n" for w in held))
            stream.flush()


def main(argv: list[str] | None = None) -> int:
    """`python -m chatrl.serve.chat` = `chatrl chat` (one parser, one error format)."""
    from ..cli import main as cli_main

    return cli_main(["chat", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
