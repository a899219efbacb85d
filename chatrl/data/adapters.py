"""Named-dataset adapters: one function per dataset of DATASETS.md, row in -> unified row out.

The unified row (the schema every source becomes):
    messages: [{"role": "user"|"assistant"|"system", "content": str}, ...]  the prompt, ending
              with a user turn
    chosen:   str           the preferred response (or the SFT response)
    rejected: str | None    the other response; None for SFT-only data

Adapters work on plain dicts, so the same code serves a hub download and a local file written in
that dataset's schema ("Dahoas/rm-static:/path/rows.jsonl", see sources.py). A row that breaks
the schema raises `RowError(field, problem)`; the caller turns it into a one-line `DataError`
naming the file and row, or skips and counts it (--skip-bad-rows). An adapter may instead
return None for a row that is well-formed but, by the dataset's own definition, holds no example
(mkqa's unanswerable questions, whose answer text is null); such rows are counted as
"filtered_rows", never silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from ..errors import DataError
from .templates import parse_plain_conversation

Row = dict[str, Any]
ROLES = ("system", "user", "assistant")
# Role spellings seen in the wild (ShareGPT, OpenAssistant exports) mapped to ours.
_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant",
                 "prompter": "user", "chatgpt": "assistant"}


class RowError(Exception):
    """One row breaks its source's schema: `field` is the dotted path, `problem` says how."""

    def __init__(self, field: str | None, problem: str):
        super().__init__(f"field {field!r} {problem}" if field else problem)
        self.field = field
        self.problem = problem


# ---------------------------------------------------------------------------------------------
# Field access with precise errors

_PATH_TOKEN = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def get_field(row: Row, path: str) -> Any:
    """Value at a dotted path such as "question.full_text" or "answers.zh_cn[0].text".

    Raises RowError naming the first part of the path that is missing or has the wrong type.
    A list index into a dict of lists (how `datasets` stores a sequence of structs) takes the
    index-th item of every list, so both layouts of nested data work.
    """
    cur: Any = row
    done = ""
    for key, index in _PATH_TOKEN.findall(path):
        here = f"{done}.{key}" if key and done else (key or f"{done}[{index}]")
        if key:
            if not isinstance(cur, dict):
                raise RowError(done, f"should be an object with a {key!r} field but is "
                                     f"{type(cur).__name__} ({_short(cur)})")
            if key not in cur or cur[key] is None:
                raise RowError(here, "is missing")
            cur = cur[key]
        else:
            i = int(index)
            if isinstance(cur, dict) and cur and all(isinstance(v, list) for v in cur.values()):
                if any(len(v) <= i for v in cur.values()):
                    raise RowError(done, "is an empty list" if i == 0 else f"has no item {i}")
                cur = {k: v[i] for k, v in cur.items()}
            elif isinstance(cur, list):
                if len(cur) <= i:
                    raise RowError(done, "is an empty list" if i == 0 else f"has no item {i}")
                cur = cur[i]
            else:
                raise RowError(done, f"should be a list but is {type(cur).__name__} ({_short(cur)})")
            if cur is None:
                raise RowError(here, "is missing")
        done = here
    return cur


def get_text(row: Row, path: str) -> str:
    """A non-empty string at `path`, stripped; RowError if missing, not text or empty."""
    value = get_field(row, path)
    return check_text(value, path)


def check_text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise RowError(field, f"should be text but is {type(value).__name__} ({_short(value)})")
    value = value.strip()
    if not value:
        raise RowError(field, "is empty")
    return value


def has_field(row: Row, path: str) -> bool:
    try:
        get_field(row, path)
    except RowError:
        return False
    return True


def wrap(text: str) -> list[dict]:
    """DATASETS.md's "Human/Assistant wrap": the text as one user turn."""
    return [{"role": "user", "content": text}]


def plain_prompt(text: str, field: str) -> list[dict]:
    """A `\\n\\nHuman: ..\\n\\nAssistant:` prompt (one or several turns) as messages."""
    turns = parse_plain_conversation(text)
    return checked_prompt(turns, field)


def checked_prompt(turns: list[dict], field: str) -> list[dict]:
    """Validate that a prompt conversation is non-empty and ends with a user turn."""
    turns = [t for t in turns if t["content"] or t["role"] != "system"]
    if not turns:
        raise RowError(field, "is empty")
    if any(not t["content"] for t in turns):
        raise RowError(field, "has an empty turn")
    if turns[-1]["role"] != "user":
        article = "an" if turns[-1]["role"] == "assistant" else "a"
        raise RowError(field, f"ends with {article} {turns[-1]['role']} turn; a prompt must end with the "
                              "user's turn (the one the response answers)")
    return turns


def check_messages(value: Any, field: str) -> list[dict]:
    """A list of {"role", "content"} turns (also {"from", "value"}), roles normalised."""
    if not isinstance(value, list):
        raise RowError(field, f"should be a list of {{'role', 'content'}} turns but is "
                              f"{type(value).__name__} ({_short(value)})")
    turns = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise RowError(f"{field}[{i}]", f"should be a {{'role', 'content'}} object but is "
                                            f"{type(m).__name__} ({_short(m)})")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        if not isinstance(role, str):
            raise RowError(f"{field}[{i}].role", "is missing" if role is None else
                           f"should be text but is {type(role).__name__}")
        role = _ROLE_ALIASES.get(role.lower(), role.lower())
        if role not in ROLES:
            raise RowError(f"{field}[{i}].role", f"is {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise RowError(f"{field}[{i}].content", "is missing" if content is None else
                           f"should be text but is {type(content).__name__} ({_short(content)})")
        turns.append({"role": role, "content": content.strip()})
    return turns


def unified(messages: list[dict], chosen: str, rejected: str | None) -> Row:
    return {"messages": messages, "chosen": chosen, "rejected": rejected}


# ---------------------------------------------------------------------------------------------
# The adapters of DATASETS.md


def _rm_static(row: Row) -> Row:
    # Dahoas/rm-static and full-hh-rlhf: prompt already "\n\nHuman: ..\n\nAssistant:".
    return unified(plain_prompt(get_text(row, "prompt"), "prompt"),
                   get_text(row, "chosen"), get_text(row, "rejected"))


def _synthetic_gptj(row: Row) -> Row:
    return unified(wrap(get_text(row, "prompt")), get_text(row, "chosen"), get_text(row, "rejected"))


def _after_last_assistant(row: Row, field: str) -> str:
    text = get_text(row, field)
    return check_text(text.rsplit("Assistant:", 1)[-1], field)


def _yitingxie(row: Row) -> Row:
    # The prompt lacks the final "Assistant:"; chosen/rejected repeat it before the answer.
    prompt = get_text(row, "prompt") + "\n\nAssistant:"
    return unified(plain_prompt(prompt, "prompt"), _after_last_assistant(row, "chosen"),
                   _after_last_assistant(row, "rejected"))


# Numeric citation markers: [1], [2, 3], [1-3], with the space before them.
_CITATION = re.compile(r"\s*\[\d+(?:\s*[,\-\u2013]\s*\d+)*\]")


def remove_citations(text: str) -> str:
    return _CITATION.sub("", text).strip()


def _number(row: Row, field: str) -> float:
    value = get_field(row, field)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RowError(field, f"should be a number but is {type(value).__name__} ({_short(value)})")
    return float(value)


def _webgpt(row: Row) -> Row:
    prompt = wrap(get_text(row, "question.full_text"))
    score_0, score_1 = _number(row, "score_0"), _number(row, "score_1")
    a0 = check_text(remove_citations(get_text(row, "answer_0")), "answer_0")
    a1 = check_text(remove_citations(get_text(row, "answer_1")), "answer_1")
    # A tie goes to answer_0 (as DeepSpeed-Chat did).
    chosen, rejected = (a0, a1) if score_0 >= score_1 else (a1, a0)
    return unified(prompt, chosen, rejected)


def _shp(row: Row) -> Row:
    label = get_field(row, "labels")
    if isinstance(label, bool) or label not in (0, 1):
        raise RowError("labels", f"should be 0 or 1 but is {_short(label)}")
    a, b = get_text(row, "human_ref_A"), get_text(row, "human_ref_B")
    chosen, rejected = (a, b) if label == 1 else (b, a)
    return unified(wrap(get_text(row, "history")), chosen, rejected)


_USER_MARK = re.compile(r"\bUSER:")
_ASSISTANT_MARK = re.compile(r"\bASSISTANT:")


def _sharegpt_vicuna(row: Row) -> Row:
    prompt = get_text(row, "prompt")
    prompt = _ASSISTANT_MARK.sub("Assistant:", _USER_MARK.sub("Human:", prompt))
    if not prompt.rstrip().endswith("Assistant:"):
        prompt += "\n\nAssistant:"
    return unified(plain_prompt(prompt, "prompt"), get_text(row, "label"), None)


def _zhihu(row: Row) -> Row:
    return unified(wrap(get_text(row, "INSTRUCTION")), get_text(row, "RESPONSE"), None)


def _miracl(rejected_optional: bool) -> Callable[[Row], Row]:
    def adapt(row: Row) -> Row:
        prompt = wrap(get_text(row, "query"))
        chosen = get_text(row, "positive_passages[0].text")
        negatives = get_field(row, "negative_passages")
        if rejected_optional and isinstance(negatives, list) and not negatives:
            rejected = None  # miracl-ja: a query without negatives is an SFT example
        else:
            rejected = get_text(row, "negative_passages[0].text")
        return unified(prompt, chosen, rejected)
    return adapt


def _hc3(row: Row) -> Row:
    return unified(wrap(get_text(row, "question")), get_text(row, "human_answers[0]"), None)


def _mkqa(lang: str) -> Callable[[Row], Row | None]:
    def adapt(row: Row) -> Row | None:
        prompt = wrap(get_text(row, f"queries.{lang}"))
        answer = get_field(row, f"answers.{lang}[0]")
        if isinstance(answer, dict) and answer.get("text") is None and "text" in answer:
            return None  # an unanswerable question: mkqa stores its answer text as null
        return unified(prompt, get_text(row, f"answers.{lang}[0].text"), None)
    return adapt


def _qg_jaquad(row: Row) -> Row:
    return unified(wrap(get_text(row, "question")), get_text(row, "sentence"), None)


def _qag_jaquad(row: Row) -> Row:
    return unified(wrap(get_text(row, "questions[0]")), get_text(row, "paragraph"), None)


# ---------------------------------------------------------------------------------------------
# Local files: prompt/chosen/rejected columns or chat-style messages

_RESPONSE_FIELDS = ("chosen", "response", "completion")


def _response(row: Row, field: str) -> str:
    """A response given as text or as a message list (its last assistant turn)."""
    value = get_field(row, field)
    if isinstance(value, list):
        turns = check_messages(value, field)
        answers = [t for t in turns if t["role"] == "assistant"]
        if not answers:
            raise RowError(field, "is a message list without an assistant turn")
        return check_text(answers[-1]["content"], field)
    return check_text(value, field)


def _local_prompt(row: Row) -> list[dict]:
    value = get_field(row, "prompt")
    if isinstance(value, list):
        return checked_prompt(check_messages(value, "prompt"), "prompt")
    return plain_prompt(check_text(value, "prompt"), "prompt")


def adapt_local(row: Row) -> Row:
    """A local row: prompt + chosen/response (+ rejected), or chat-style `messages`.

    - `prompt`: text (with or without Human:/Assistant: markers, parsed into turns) or messages;
    - `chosen` (or `response`, `completion`): text, or a message list whose last assistant turn
      is the response; `rejected` likewise, optional;
    - `messages` instead of `prompt`: with `chosen` present, all of `messages` is the prompt;
      without it, the turns before the last assistant turn are the prompt and that turn is the
      response.
    """
    if not isinstance(row, dict):
        raise RowError(None, f"should be an object with prompt/chosen fields but is "
                             f"{type(row).__name__} ({_short(row)})")
    rejected = _response(row, "rejected") if row.get("rejected") is not None else None
    response_field = next((f for f in _RESPONSE_FIELDS if row.get(f) is not None), None)
    if row.get("messages") is not None and "prompt" not in row:
        turns = check_messages(row["messages"], "messages")
        if response_field is not None:
            return unified(checked_prompt(turns, "messages"), _response(row, response_field), rejected)
        last = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=None)
        if last is None:
            raise RowError("chosen", "is missing and `messages` has no assistant turn to use as "
                                     "the response")
        prompt = checked_prompt(turns[:last], "messages")
        return unified(prompt, check_text(turns[last]["content"], f"messages[{last}].content"),
                       rejected)
    prompt = _local_prompt(row)
    if response_field is None:
        raise RowError("chosen", "is missing")
    return unified(prompt, _response(row, response_field), rejected)


# ---------------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class Adapter:
    """How one named dataset maps to the unified schema."""

    name: str                       # the name users pass (DeepSpeed-Chat's spelling)
    hub_name: str                   # what datasets.load_dataset gets
    fn: Callable[[Row], Row | None]
    pairwise: bool                  # has rejected answers (usable in step 2)
    eval_splits: tuple[str, ...]    # its held-out split names; () -> seeded 9:1 split
    fields: str                     # the fields a row needs, for error messages
    hub_config: str | None = None


ADAPTERS: dict[str, Adapter] = {a.name: a for a in [
    Adapter("Dahoas/rm-static", "Dahoas/rm-static", _rm_static, True, ("test",),
            "prompt, chosen and rejected"),
    Adapter("Dahoas/full-hh-rlhf", "Dahoas/full-hh-rlhf", _rm_static, True, ("test",),
            "prompt, chosen and rejected"),
    Adapter("Dahoas/synthetic-instruct-gptj-pairwise", "Dahoas/synthetic-instruct-gptj-pairwise",
            _synthetic_gptj, True, (), "prompt, chosen and rejected"),
    Adapter("yitingxie/rlhf-reward-datasets", "yitingxie/rlhf-reward-datasets", _yitingxie, True,
            ("test",), "prompt, chosen and rejected"),
    Adapter("openai/webgpt_comparisons", "openai/webgpt_comparisons", _webgpt, True, (),
            "question.full_text, answer_0, answer_1, score_0 and score_1"),
    Adapter("stanfordnlp/SHP", "stanfordnlp/SHP", _shp, True, ("validation",),
            "history, human_ref_A, human_ref_B and labels"),
    Adapter("pvduy/sharegpt_alpaca_oa_vicuna_format", "pvduy/sharegpt_alpaca_oa_vicuna_format",
            _sharegpt_vicuna, False, ("test",), "prompt and label"),
    Adapter("wangrui6/Zhihu-KOL", "wangrui6/Zhihu-KOL", _zhihu, False, (),
            "INSTRUCTION and RESPONSE"),
    Adapter("Cohere/miracl-zh-queries-22-12", "Cohere/miracl-zh-queries-22-12", _miracl(False),
            True, ("dev",), "query, positive_passages[0].text and negative_passages[0].text"),
    Adapter("Hello-SimpleAI/HC3-Chinese", "Hello-SimpleAI/HC3-Chinese", _hc3, False, (),
            "question and human_answers[0]", hub_config="all"),
    Adapter("mkqa-Chinese", "mkqa", _mkqa("zh_cn"), False, (), "queries.zh_cn and answers.zh_cn[0].text"),
    Adapter("mkqa-Japanese", "mkqa", _mkqa("ja"), False, (), "queries.ja and answers.ja[0].text"),
    Adapter("Cohere/miracl-ja-queries-22-12", "Cohere/miracl-ja-queries-22-12", _miracl(True),
            True, ("dev",), "query and positive_passages[0].text (negative_passages optional)"),
    Adapter("lmqg/qg_jaquad", "lmqg/qg_jaquad", _qg_jaquad, False, ("validation",),
            "question and sentence"),
    Adapter("lmqg/qag_jaquad", "lmqg/qag_jaquad", _qag_jaquad, False, ("validation",),
            "questions[0] and paragraph"),
]}

LOCAL = Adapter("local", "", adapt_local, False, ("test", "validation", "valid", "dev", "eval"),
                "prompt and chosen (or response), and optionally rejected; or chat-style messages")


def find_adapter(name: str) -> Adapter | None:
    """The adapter for a dataset name (exact, or case-insensitive), or None."""
    if name in ADAPTERS:
        return ADAPTERS[name]
    lowered = {k.lower(): a for k, a in ADAPTERS.items()}
    return lowered.get(name.lower())


def get_adapter(name: str) -> Adapter:
    adapter = LOCAL if name == "local" else find_adapter(name)
    if adapter is None:
        raise DataError(f"dataset {name!r} has no adapter; known names: {', '.join(ADAPTERS)} "
                        "(or pass a local .json/.jsonl/.parquet/.csv file or folder)")
    return adapter


def row_error_message(where: str, err: RowError, adapter: Adapter) -> str:
    """The one-line message for a bad row: where, what, and how to fix it."""
    needs = ("every row needs " + adapter.fields if adapter is LOCAL
             else f"every {adapter.name} row needs {adapter.fields}")
    text = f"{where}: {err}; {needs}, or pass --skip-bad-rows to skip such rows"
    return " ".join(text.split())  # one line, whatever the data held


def adapt_rows(name: str, rows: Iterable[Row], *, source: str | None = None,
               skip_bad_rows: bool = False, stats: dict | None = None,
               numbers: Iterable[int] | None = None) -> list[Row]:
    """Map raw rows of dataset `name` ("local" for the generic file schema) to unified rows.

    source: how errors name the rows' origin (a file name; default `name`).
    numbers: the row number of each row as the user sees it (default 1, 2, 3...).
    A bad row raises DataError("<source> row <n>: field '<f>' ..."), or with skip_bad_rows is
    skipped and counted in stats["skipped_rows"]; rows the dataset itself marks as holding no
    example are counted in stats["filtered_rows"].
    """
    adapter = get_adapter(name)
    source = source or name
    out: list[Row] = []
    counts = stats if stats is not None else {}
    counts.setdefault("rows_in", 0)
    counts.setdefault("skipped_rows", 0)
    counts.setdefault("filtered_rows", 0)
    numbering = iter(numbers) if numbers is not None else None
    for i, row in enumerate(rows, 1):
        n = next(numbering) if numbering is not None else i
        counts["rows_in"] += 1
        try:
            if isinstance(row, RowError):  # a row the reader could not even parse
                raise row
            if not isinstance(row, dict):
                raise RowError(None, f"should be an object but is {type(row).__name__} ({_short(row)})")
            result = adapter.fn(row)
        except RowError as e:
            if not skip_bad_rows:
                raise DataError(row_error_message(f"{source} row {n}", e, adapter)) from None
            counts["skipped_rows"] += 1
            continue
        if result is None:
            counts["filtered_rows"] += 1
            continue
        out.append(result)
    counts["rows_kept"] = counts.get("rows_kept", 0) + len(out)
    return out
