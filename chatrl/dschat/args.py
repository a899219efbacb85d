"""Flags that DeepSpeed itself adds to every DeepSpeed-Chat command, accepted by chatrl.

Every DeepSpeed-Chat `main.py` calls `deepspeed.add_config_arguments(parser)`, so its scripts
pass `--deepspeed` (and users may pass `--deepspeed_config FILE`, or the older `--deepscale`,
`--deepscale_config FILE`, `--deepspeed_mpi`); the `deepspeed` launcher adds `--local_rank=N`.

- `--deepspeed`, `--deepscale`, `--deepspeed_mpi`: accepted and ignored. chatrl always trains
  through DeepSpeed, and MPI discovery is the launcher's business (`deepspeed --launcher ...`).
- `--deepspeed_config FILE` / `--deepscale_config FILE`: the step config's `deepspeed_config`
  field; the file is merged into the engine config (chatrl/engine/ds_user_config.py).
- `--local_rank N` / `--local_rank=N` / `--local-rank=N`, anywhere on the command line, for
  any command: moved right behind a step command (whose config records it) and dropped for the
  others; it sets LOCAL_RANK when the launcher has not.
"""

from __future__ import annotations

import argparse
import os

# Namespace destination of the accepted-and-ignored switches (dropped before config building).
IGNORED_DEST = "_deepspeed_launcher_switches"
_SWITCHES = ("--deepspeed", "--deepscale", "--deepspeed_mpi", "--deepspeed-mpi")
_LOCAL_RANK = ("--local_rank", "--local-rank")


def add_deepspeed_args(parser: argparse.ArgumentParser, config_flag: bool) -> None:
    """Add DeepSpeed's own flags to `parser`.

    config_flag: also add `--deepspeed_config` (parsers whose config dataclass already defines
    it as a field, the step commands, pass False and only get the `--deepscale_config` alias).
    """
    group = parser.add_argument_group("DeepSpeed's own flags (as in DeepSpeed-Chat's scripts)")
    group.add_argument(*_SWITCHES, dest=IGNORED_DEST, action="store_true", default=argparse.SUPPRESS,
                       help="accepted for DeepSpeed-Chat compatibility; chatrl always uses DeepSpeed")
    names = ["--deepscale_config", "--deepscale-config"]
    if config_flag:
        names = ["--deepspeed_config", "--deepspeed-config"] + names
    group.add_argument(*names, dest="deepspeed_config", default=argparse.SUPPRESS, metavar="FILE",
                       help="DeepSpeed JSON config merged into the engine config (chatrl's own "
                            "settings win where both set a value; the merge is logged)")


def pop_local_rank(argv: list[str]) -> tuple[list[str], str | None]:
    """`argv` without any `--local_rank` flag (either spelling, `=N` or ` N`), and its value."""
    out: list[str] = []
    value = None
    i = 0
    while i < len(argv):
        a = argv[i]
        name, eq, val = a.partition("=")
        if name in _LOCAL_RANK:
            if eq:
                value = val
            elif i + 1 < len(argv) and argv[i + 1].lstrip("-").isdigit():
                value = argv[i + 1]
                i += 1
            i += 1
            continue
        out.append(a)
        i += 1
    return out, value


def apply_local_rank(argv: list[str], keep_for: tuple[str, ...] = ()) -> list[str]:
    """`argv` with `--local_rank` moved behind the command if it is one of `keep_for`, else
    removed; the value is exported as LOCAL_RANK unless the launcher set it."""
    argv, value = pop_local_rank(argv)
    if value is None or not value.lstrip("-").isdigit():
        return argv
    os.environ.setdefault("LOCAL_RANK", value)
    if argv and argv[0] in keep_for:
        argv = [argv[0], f"--local_rank={value}", *argv[1:]]
    return argv
