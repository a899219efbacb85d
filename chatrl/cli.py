"""The `chatrl` command.

    chatrl train   [flags]        all three steps (or --step 1 2 3 any subset), resumable
    chatrl sft|rm|ppo|dpo [flags] one step (every option of the step; --config, --preset, key=value)
    chatrl grpo [flags]           online RL with verifiable / function / model / remote rewards
    chatrl rl --algo NAME         the same with any algorithm: ppo grpo dr_grpo dapo rloo
                                  reinforce_pp gspo
    chatrl eval reward|prompts    score pairs with a reward model / compare answers of two models
    chatrl chat --path MODEL      terminal chat
    chatrl export --format dschat --path MODEL --output-dir DIR
                                  write a model in DeepSpeed-Chat's layout (pytorch_model.bin)
    chatrl serve --path MODEL     OpenAI-compatible HTTP server
                                  + a web page at / (chat, compare two models, label answers)
    chatrl inspect RUN_DIR        rollout inspector of a step-3 run (--html FILE: write one page)

Errors caused by the user's input print one line and exit with status 2.
"""

from __future__ import annotations

import os
import sys
import time

STEPS = ("sft", "rm", "ppo", "dpo", "grpo", "rl")
USAGE = __doc__


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import logging
    import warnings

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*")
    warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.*")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        import datasets

        datasets.utils.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    except ImportError:
        pass


def run_step(step: str, argv: list[str]):
    from .config import parse_step_args

    cfg = parse_step_args("grpo" if step == "rl" else step, argv, prog=f"chatrl {step}")
    if step == "sft":
        from .steps.sft import run_sft

        return run_sft(cfg)
    if step == "rm":
        from .steps.reward import run_rm

        return run_rm(cfg)
    if step in ("ppo", "grpo", "rl"):
        from .steps.ppo import run_ppo

        return run_ppo(cfg)
    if step == "dpo":
        from .steps.dpo import run_dpo

        return run_dpo(cfg)
    raise AssertionError(step)


# Longest a Python start-up (interpreter, site-packages) may take before it imports chatrl; a
# process older than that ran something else first (see process_start)
STARTUP_MAX_S = 10.0


def process_start() -> float:
    """When this Python program started, on time.time()'s clock. `chatrl train`'s time budget
    counts from here when it runs as a command, so Python's start-up and imports count too: with a
    cold page cache the imports and step planning before its estimate took 33 s here (2.7 s warm,
    ~330 MB read from disk), and a run that counted from after them kept 15 minutes by its own clock
    (14:13) but took 15:28 by the wall clock, its clock having started 66 s late.

    The process's creation time (psutil), unless it is more than STARTUP_MAX_S older than chatrl's
    import: a shell that ends in `... && chatrl train` (the README's first command) may exec
    Python in its own process, which keeps the shell's start, and the budget then counted the
    ~2 minutes of installs before it. Then the import's time (chatrl.IMPORTED), a little late
    (the interpreter's own start-up) but not early."""
    from . import IMPORTED

    try:
        import psutil  # a DeepSpeed dependency

        created = min(psutil.Process().create_time(), time.time())
    except Exception:  # noqa: BLE001 - no process table
        return IMPORTED
    return created if IMPORTED - created <= STARTUP_MAX_S else IMPORTED


def dispatch(argv: list[str], started: float | None = None) -> int:
    """Run one command. started: when the command's process started (the time budget's origin)."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd in ("--version", "version"):
        from . import __version__

        print(f"chatrl {__version__}")
        return 0
    _quiet_libraries()
    if cmd in STEPS:
        run_step(cmd, rest)
        return 0
    if cmd == "train":
        from .pipeline import train_main

        return train_main(rest, started=started)
    if cmd == "inspect":
        from .inspector import inspect_main

        return inspect_main(rest)
    if cmd == "eval":
        from .evaluate import eval_main

        return eval_main(rest)
    if cmd == "export":
        from .dschat.export import export_main

        return export_main(rest)
    if cmd in ("chat", "serve"):
        import argparse
        import importlib

        mod = importlib.import_module(f".serve.{'chat' if cmd == 'chat' else 'server'}", __package__)
        parser = argparse.ArgumentParser(prog=f"chatrl {cmd}")
        getattr(mod, f"add_{cmd}_args")(parser)
        return getattr(mod, f"{cmd}_main")(parser.parse_args(rest)) or 0
    print(f"chatrl: unknown command {cmd!r}\n{USAGE}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None, started: float | None = None) -> int:
    """The `chatrl` command: argv None reads the command line, and the process is then the
    command's own (its start is the time budget's origin); a Python caller passes argv, and
    `started` where its process also started for this command (train.py)."""
    if argv is None:
        started = process_start() if started is None else started
    argv = sys.argv[1:] if argv is None else list(argv)
    # `deepspeed --num_gpus N -m chatrl sft ...` puts --local_rank=R before the command, and
    # DeepSpeed-Chat users type it anywhere: it moves behind a step name (its config records it)
    # and is dropped elsewhere (LOCAL_RANK carries it).
    from .dschat.args import apply_local_rank

    argv = apply_local_rank(argv, keep_for=STEPS)
    return guarded(lambda: dispatch(argv, started))


def guarded(run) -> int:
    """`run()`'s exit code; a user error (ChatRLError) prints as one line and exits 2."""
    from .errors import ChatRLError

    try:
        code = run()
    except ChatRLError as e:
        msg = " ".join(str(e).split())  # one line
        print(f"chatrl: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("chatrl: interrupted", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
