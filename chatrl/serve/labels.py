"""Preference labels collected in the web UI's Compare tab, written as chatrl training data.

Each vote on two answers becomes one JSON line:

- "left better" / "right better" -> the preference file (default preferences.jsonl), one row
  in chatrl's data format, read as is by `chatrl rm --data-path FILE` and `chatrl dpo
  --data-path FILE`:
      {"prompt": ..., "chosen": ..., "rejected": ..., "chosen_model": ..., "rejected_model": ...,
       "verdict": "left"|"right", "time": "2026-01-31T12:00:00Z", ...}
  `prompt` is the user's text, or a message list when a system prompt was set.
- "tie" / "both bad" carry no preference, so they go to a second file beside it,
  <stem>.ties.jsonl, with {"prompt", "answer_a", "answer_b", "model_a", "model_b", "verdict"},
  and the preference file stays valid training data.

Writes are atomic per row: the whole line goes out in one write() on a file opened with
O_APPEND, under a thread lock and an exclusive flock (other processes appending to the same
file, e.g. two servers), so concurrent votes never interleave or tear lines.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from pathlib import Path

from ..errors import ChatRLError

PREFERENCE = ("left", "right")
NO_PREFERENCE = ("tie", "both_bad")
VERDICTS = PREFERENCE + NO_PREFERENCE


def ties_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(f"{path.stem}.ties{path.suffix or '.jsonl'}")


def count_rows(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    except FileNotFoundError:
        return 0


def append_line(path: Path, row: dict) -> None:
    """Append one JSON line atomically (see the module docstring). Not thread-safe alone:
    callers in one process hold a lock too (flock is per open file, not per thread)."""
    data = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            # A previous writer died mid-line: end that line so this row stays whole.
            data = b"\n" + data
        view = memoryview(data)
        while view:  # write() may be partial on a full disk or a signal; finish the line
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class LabelStore:
    """The preference file and its ties file, with counts for the page."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.ties = ties_path(self.path)
        if self.path.is_dir():
            raise ChatRLError(f"--labels {self.path} is a folder; give a file name, e.g. "
                              f"{self.path / 'preferences.jsonl'}")
        self._lock = threading.Lock()
        self._counts = {"pairs": count_rows(self.path), "ties": count_rows(self.ties)}

    def counts(self) -> dict:
        with self._lock:
            return dict(self._counts)

    def add(self, prompt: str, system: str | None, left: dict, right: dict, verdict: str,
            **extra) -> dict:
        """Record one vote; left/right are {"model", "text"}. Returns the updated counts.

        Raises ChatRLError for a verdict that is not one of VERDICTS, or a preference whose
        answer is empty (chatrl's data loader refuses empty answers; vote "both bad" instead).
        """
        if verdict not in VERDICTS:
            raise ChatRLError(f"verdict {verdict!r} is not one of {', '.join(VERDICTS)}")
        if not prompt.strip():
            raise ChatRLError("the prompt is empty; there is nothing to label")
        prompt_field = ([{"role": "system", "content": system}, {"role": "user", "content": prompt}]
                        if system else prompt)
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if verdict in PREFERENCE:
            chosen, rejected = (left, right) if verdict == "left" else (right, left)
            for side, answer in (("chosen", chosen), ("rejected", rejected)):
                if not answer["text"].strip():
                    raise ChatRLError(f"the {side} answer (from {answer['model']}) is empty, and an "
                                      "empty answer cannot be training data; vote 'both bad' or "
                                      "generate again")
            row = {"prompt": prompt_field, "chosen": chosen["text"], "rejected": rejected["text"],
                   "chosen_model": chosen["model"], "rejected_model": rejected["model"],
                   "verdict": verdict, "time": when, **extra}
            path, key = self.path, "pairs"
        else:
            row = {"prompt": prompt_field, "answer_a": left["text"], "answer_b": right["text"],
                   "model_a": left["model"], "model_b": right["model"], "verdict": verdict,
                   "time": when, **extra}
            path, key = self.ties, "ties"
        with self._lock:
            append_line(path, row)
            self._counts[key] += 1
            return dict(self._counts)

    def labelled_prompts(self) -> set[str]:
        """The user texts already voted on (in either file), to resume a --prompts session."""
        done = set()
        for path in (self.path, self.ties):
            if not path.exists():
                continue
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    prompt = json.loads(line).get("prompt")
                except (json.JSONDecodeError, AttributeError):
                    continue
                if isinstance(prompt, list) and prompt:
                    prompt = prompt[-1].get("content") if isinstance(prompt[-1], dict) else None
                if isinstance(prompt, str):
                    done.add(prompt)
        return done


def read_prompts(path: str | os.PathLike) -> list[str]:
    """The prompts of a labelling session: a .txt file (one per line) or a .jsonl/.json file of
    rows with a "prompt" (text, or messages whose last user turn is taken)."""
    path = Path(path)
    if not path.is_file():
        raise ChatRLError(f"--prompts {path} does not exist; give a .txt file (one prompt a line) "
                          "or a .jsonl file with a 'prompt' field per row")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        try:
            rows = (json.loads(text) if path.suffix == ".json"
                    else [json.loads(line) for line in text.splitlines() if line.strip()])
        except json.JSONDecodeError as e:
            raise ChatRLError(f"--prompts {path} is not valid JSON{'' if path.suffix == '.json' else ' lines'} "
                              f"({e}); write one object per line like {{\"prompt\": \"...\"}}") from e
        prompts = []
        for i, row in enumerate(rows if isinstance(rows, list) else [], 1):
            prompt = row.get("prompt") if isinstance(row, dict) else row if isinstance(row, str) else None
            if isinstance(prompt, list):  # messages: the last user turn
                users = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
                prompt = users[-1] if users else None
            if not isinstance(prompt, str) or not prompt.strip():
                raise ChatRLError(f"--prompts {path} row {i} has no text 'prompt' field; each row "
                                  "needs one, e.g. {\"prompt\": \"Tell me about the sea.\"}")
            prompts.append(prompt.strip())
    if not prompts:
        raise ChatRLError(f"--prompts {path} holds no prompt")
    return prompts
