"""Built-in rule-based rewards for tasks with a checkable answer.

Each compares the completion with the prompt data's answer column (default "answer") and gives
1.0 (right) or 0.0 (wrong), except `format`, which checks the completion's form:

    math     mathematical equivalence of the final answer (the math-verify library: LaTeX,
             \\boxed{}, fractions, sets...); the gold answer may be plain text or LaTeX
    numeric  the completion's answer number (the first number after "####", in \\boxed{} or
             after "answer is", else the last number in it) equals the gold number (relative
             tolerance 1e-6)
    exact    the completion's final answer, normalised (case, spaces, trailing period,
             surrounding quotes), equals the normalised gold answer
    format   the completion matches --format-pattern (a regex, searched)
"""

from __future__ import annotations

import math
import re

from ..errors import ConfigError

__all__ = ["BUILTIN_REWARDS", "final_answer", "final_number", "normalise_answer", "builtin_reward"]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
DEFAULT_FORMAT = r"####\s*\S|\\boxed\{|[Tt]he (?:final )?answer is"


def _boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (balanced braces), or None."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth, j = 0, i
    while j < len(text):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
        j += 1
    return None


def _first_line(text: str) -> str:
    text = text.strip()
    return text.splitlines()[0] if text else ""


def _marked_answer(text: str) -> str | None:
    """The part of a completion after its answer mark: after the last "####", the last \\boxed{},
    after the last "answer is" (its first line); None without a mark."""
    if "####" in text:
        return _first_line(text.rsplit("####", 1)[1])
    boxed = _boxed(text)
    if boxed is not None:
        return boxed
    marks = list(re.finditer(r"answer is[:\s]*", text, re.I))
    if marks:
        return _first_line(text[marks[-1].end():])
    return None


def final_answer(text: str) -> str:
    """The part of a completion that states its answer (see _marked_answer), else the whole text."""
    marked = _marked_answer(text)
    return marked if marked is not None else text.strip()


def final_number(text: str) -> float | None:
    """The completion's answer as a number (commas dropped), or None: the first number after its
    answer mark ("The answer is 25, because 4..." is 25), else the last number in it."""
    marked = _marked_answer(text)
    found = _NUMBER.findall(marked) if marked is not None else []
    number = found[0] if found else (_NUMBER.findall(text) or [None])[-1]
    if number is None:
        return None
    try:
        return float(number.replace(",", ""))
    except ValueError:
        return None


def normalise_answer(text: str) -> str:
    t = " ".join(str(text).strip().lower().split())
    t = t.strip("\"'`")
    return t.rstrip(".!").strip()


def _gold(columns: dict, answer_column: str, name: str) -> list:
    if answer_column not in columns:
        have = ", ".join(sorted(columns)) or "none"
        raise ConfigError(f"reward {name} compares answers with the prompt data's {answer_column!r} "
                          f"column, which the data does not have (its columns: {have}); pass "
                          "--answer-column NAME or use data with answers")
    return columns[answer_column]


class Verifier:
    is_correctness = True
    per_sample_retry = True

    def __init__(self, name: str, answer_column: str = "answer"):
        self.name = name
        self.answer_column = answer_column

    def __call__(self, batch) -> list[float]:
        gold = _gold(batch.columns, self.answer_column, self.name)
        return [self.check(t, g) for t, g in zip(batch.texts, gold)]

    def check(self, text: str, gold) -> float:  # pragma: no cover - abstract
        raise NotImplementedError


class NumericVerifier(Verifier):
    def check(self, text: str, gold) -> float:
        got = final_number(text)
        want = gold if isinstance(gold, (int, float)) else final_number(str(gold))
        if got is None or want is None:
            return 0.0
        return 1.0 if math.isclose(got, float(want), rel_tol=1e-6, abs_tol=1e-9) else 0.0


class ExactVerifier(Verifier):
    def check(self, text: str, gold) -> float:
        want = normalise_answer(gold)
        return 1.0 if normalise_answer(final_answer(text)) == want or normalise_answer(text) == want else 0.0


class MathVerifier(Verifier):
    def __init__(self, name: str, answer_column: str = "answer"):
        super().__init__(name, answer_column)
        try:
            import math_verify  # noqa: F401
        except ImportError as e:
            raise ConfigError("the math reward needs the math-verify library: pip install math-verify") from e

    def check(self, text: str, gold) -> float:
        from math_verify import parse, verify

        g = str(gold)
        gold_parsed = parse(g if ("$" in g or "\\" in g) else f"${g}$")
        if not gold_parsed:
            return 0.0
        answer = parse(text)
        return 1.0 if answer and verify(gold_parsed, answer) else 0.0


class FormatReward:
    is_correctness = False
    per_sample_retry = True

    def __init__(self, name: str, pattern: str | None):
        self.name = name
        try:
            self.regex = re.compile(pattern or DEFAULT_FORMAT, re.S)
        except re.error as e:
            raise ConfigError(f"--format-pattern {pattern!r} is not a valid regular expression: {e}") from e

    def __call__(self, batch) -> list[float]:
        return [1.0 if self.regex.search(t) else 0.0 for t in batch.texts]


BUILTIN_REWARDS = {"math": MathVerifier, "numeric": NumericVerifier, "exact": ExactVerifier,
                   "format": FormatReward}


def builtin_reward(name: str, answer_column: str = "answer", format_pattern: str | None = None):
    if name == "format":
        return FormatReward(name, format_pattern)
    return BUILTIN_REWARDS[name](name, answer_column)
