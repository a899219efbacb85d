"""Text generation for chat and serve: one model, one conversation format, greedy or sampled.

`ChatModel` wraps a causal LM and its tokenizer with the conversation format the model was
trained with (recorded in the folder's chatrl.json, see chatrl/data/templates.py). It decodes
with an explicit token loop over the KV cache rather than `model.generate`, because serving
needs three things per token that are awkward to bolt onto `generate`:
- text pieces as they become final (streaming), never a piece that is later taken back;
- stop strings (the plain format's "\\n\\nHuman:", the request's `stop`) cut exactly;
- a per-request random generator (`seed`), so concurrent requests cannot disturb each other.

`generate()` is `stream()` joined, so a streamed answer always equals the non-streamed one.
A ChatModel is not thread-safe: chat uses it from one thread, the server from one worker.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Generator, Iterable, Sequence

import torch

from ..data.templates import PLAIN_STOP, render_prompt, resolve_template
from ..errors import ChatRLError, ConfigError
from ..models.load import load_causal_lm, load_tokenizer, read_meta, resolve_model_path

ROLES = ("system", "user", "assistant")
# strip_stop (templates.py) also cuts here: a plain-format model may start a turn after one newline.
PLAIN_STOPS = (PLAIN_STOP, "\nHuman:")


@dataclass
class Completion:
    """One answer: its text, token counts and why it ended ("stop": EOS or a stop string;
    "length": max_new_tokens or the model's context was reached)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def check_messages(messages) -> list[dict]:
    """Validate a conversation; a bare string becomes one user turn. Returns plain dicts."""
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatRLError(f"messages must be a non-empty list of {{'role', 'content'}} dicts; got "
                          f"{messages!r:.80}. Pass e.g. [{{'role': 'user', 'content': 'Hello'}}]")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ChatRLError(f"messages[{i}] is {m!r:.80}; each message needs a 'role' and a "
                              "'content', e.g. {'role': 'user', 'content': 'Hello'}")
        if m["role"] not in ROLES:
            raise ChatRLError(f"messages[{i}] has role {m['role']!r}; use one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise ChatRLError(f"messages[{i}] has content of type {type(m['content']).__name__}; "
                              "content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def check_sampling(max_new_tokens: int, temperature: float, top_p: float,
                   do_sample: bool | None = None) -> bool:
    """Validate decoding settings; returns whether to sample (default: iff temperature > 0)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ChatRLError(f"max_new_tokens is {max_new_tokens!r}; it must be a positive integer, e.g. 128")
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ChatRLError(f"temperature is {temperature!r}; it must be >= 0 (0 = greedy, e.g. 0.7)")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ChatRLError(f"top_p is {top_p!r}; it must be in (0, 1], e.g. 0.9")
    if do_sample is None:
        return temperature > 0
    if do_sample and temperature == 0:
        raise ChatRLError("do_sample=True needs a temperature > 0; use temperature 0 for greedy decoding")
    return bool(do_sample)


def _stop_list(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    stops = tuple(s for s in stop if s)
    if not all(isinstance(s, str) for s in stops):
        raise ChatRLError(f"stop must be a string or a list of strings; got {stop!r:.80}")
    return stops


def _cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Text before the earliest stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that could be the start of a stop string."""
    held = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:k]):
                held = k
                break
    return held


def _settled(text: str, stops: Sequence[str], final: bool) -> str:
    """The part of the decoded text that can no longer change: cut at stops, trimmed, and while
    generating, without a possible stop prefix, a half-decoded character or trailing spaces
    (which the final strip would remove)."""
    text, _ = _cut_at_stop(text, stops)
    if not final:
        text = text[:len(text) - _held_back(text, stops)]
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens
            text = text.rstrip("\ufffd")
        return text.lstrip().rstrip()
    return text.strip()


def _filter_top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero all but the smallest set of most likely tokens whose mass reaches top_p. probs: [vocab]."""
    if top_p >= 1.0:
        return probs
    sorted_p, order = torch.sort(probs, descending=True)
    # Keep a token if the mass before it is still below top_p (the first token always stays).
    keep_sorted = (torch.cumsum(sorted_p, dim=-1) - sorted_p) < top_p
    keep = torch.zeros_like(keep_sorted).scatter(0, order, keep_sorted)
    return probs * keep


class ChatModel:
    """A causal LM + tokenizer + conversation format, ready to answer conversations."""

    def __init__(self, model, tokenizer, template: str, name: str = "model"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.template = template
        self.name = name
        self.device = next(model.parameters()).device
        eos = {tokenizer.eos_token_id}
        for cfg in (getattr(model, "generation_config", None), model.config):
            ids = getattr(cfg, "eos_token_id", None) if cfg is not None else None
            eos.update(ids if isinstance(ids, (list, tuple)) else [ids])
        self.eos_ids = frozenset(i for i in eos if i is not None)
        self.context_length = (getattr(model.config, "max_position_embeddings", None)
                               or getattr(model.config, "n_positions", None))
        self.default_stops = PLAIN_STOPS if template == "plain" else ()
        # The KV cache argument: Transformers 5 renamed `past_key_values` to `cache` (the old
        # name warns, in the middle of the first answer); older versions know only the old one.
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    @classmethod
    def load(cls, path: str, dtype: str = "fp32", template: str = "auto",
             device: str | None = None) -> "ChatModel":
        """Load a model folder (or "tiny", a hub id, a .gguf file) for chatting.

        template "auto" uses the format recorded in the folder's chatrl.json, else the
        tokenizer's chat template if it has one, else the plain Human:/Assistant: format.
        """
        folder = resolve_model_path(path)
        tokenizer = load_tokenizer(folder, padding_side="left")
        if template == "auto" and os.path.isdir(folder):
            template = read_meta(folder).get("template", "auto")
        template = resolve_template(template, tokenizer)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model = load_causal_lm(folder, dtype=dtype, tokenizer=tokenizer)
        try:
            model.to(device)
        except (RuntimeError, AssertionError) as e:
            raise ConfigError(f"--device {device!r} cannot be used here ({e}); use --device cpu, or "
                              "cuda on a machine with a GPU") from e
        name = os.path.basename(os.path.normpath(str(path))) or str(path)
        return cls(model, tokenizer, template, name=name)

    # -- prompt ---------------------------------------------------------------------------------

    def render(self, messages) -> str:
        """The exact text the model sees for this conversation (ending ready for its answer)."""
        return render_prompt(self.tokenizer, check_messages(messages), self.template)

    def encode(self, messages) -> list[int]:
        """Token ids of the rendered prompt; raises ChatRLError if they fill the model's context."""
        text = self.render(messages)
        # The rendered template already holds its special tokens as text.
        ids = self.tokenizer(text, add_special_tokens=self.template == "plain")["input_ids"]
        if self.context_length and len(ids) >= self.context_length:
            raise ChatRLError(f"the conversation is {len(ids)} tokens long but the model's context "
                              f"holds {self.context_length}; shorten it or start a new one "
                              "(/reset in chat)")
        return ids

    # -- generation -----------------------------------------------------------------------------

    def generate(self, messages, max_new_tokens: int = 128, temperature: float = 0.7,
                 top_p: float = 0.9, do_sample: bool | None = None, seed: int | None = None,
                 stop: str | Iterable[str] | None = None) -> Completion:
        """Answer a conversation. Greedy when temperature is 0 (or do_sample=False)."""
        gen = self.stream(messages, max_new_tokens=max_new_tokens, temperature=temperature,
                          top_p=top_p, do_sample=do_sample, seed=seed, stop=stop)
        while True:
            try:
                next(gen)
            except StopIteration as done:
                return done.value

    def stream(self, messages, max_new_tokens: int = 128, temperature: float = 0.7,
               top_p: float = 0.9, do_sample: bool | None = None, seed: int | None = None,
               stop: str | Iterable[str] | None = None) -> Generator[str, None, Completion]:
        """Answer a conversation piece by piece: yields text pieces whose concatenation is the
        answer; the generator's return value (StopIteration.value) is the Completion.

        Arguments are checked and the prompt encoded now, so errors raise here, before the
        first piece is asked for.
        """
        do_sample = check_sampling(max_new_tokens, temperature, top_p, do_sample)
        stops = self.default_stops + _stop_list(stop)
        prompt_ids = self.encode(messages)
        if self.context_length:
            max_new_tokens = min(max_new_tokens, self.context_length - len(prompt_ids))
        rng = None
        if do_sample and seed is not None:
            rng = torch.Generator(device=self.device).manual_seed(int(seed))
        return self._decode_loop(prompt_ids, max_new_tokens, temperature, top_p, do_sample, rng, stops)

    def _next_token(self, logits: torch.Tensor, temperature: float, top_p: float, do_sample: bool,
                    rng: torch.Generator | None) -> int:
        """Pick the next token from the last position's logits ([vocab])."""
        if not do_sample:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        probs = _filter_top_p(probs, top_p)
        return int(torch.multinomial(probs, 1, generator=rng))

    def _decode_loop(self, prompt_ids: list[int], max_new_tokens: int, temperature: float,
                     top_p: float, do_sample: bool, rng, stops: tuple[str, ...]
                     ) -> Generator[str, None, Completion]:
        # 1. prefill the prompt; 2. one token at a time over the KV cache; 3. after each token,
        # emit the text that is now settled; 4. stop on EOS, a stop string or the length limit.
        ids = torch.tensor([prompt_ids], device=self.device)
        attention = torch.ones_like(ids)
        cache = None  # the model makes its own (a DynamicCache that knows its layer types)
        new_ids: list[int] = []
        emitted = ""
        finish = "length"
        generated = 0  # tokens sampled, the final EOS included (what the client is billed for)
        with torch.inference_mode():
            for _ in range(max_new_tokens):
                out = self.model(input_ids=ids, attention_mask=attention, use_cache=True,
                                 **{self._cache_arg: cache})
                cache = getattr(out, self._cache_arg)
                token = self._next_token(out.logits[0, -1], temperature, top_p, do_sample, rng)
                generated += 1
                if token in self.eos_ids:
                    finish = "stop"
                    break
                new_ids.append(token)
                text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
                if stops and _cut_at_stop(text, stops)[1]:
                    finish = "stop"
                    break
                settled = _settled(text, stops, final=False)
                if len(settled) > len(emitted) and settled.startswith(emitted):
                    yield settled[len(emitted):]
                    emitted = settled
                ids = torch.tensor([[token]], device=self.device)
                attention = torch.cat([attention, attention.new_ones((1, 1))], dim=1)
        final = _settled(self.tokenizer.decode(new_ids, skip_special_tokens=True), stops, final=True)
        if final.startswith(emitted) and len(final) > len(emitted):
            yield final[len(emitted):]
            emitted = final
        # `emitted` is what a streaming client saw, so it is also the non-streamed text.
        return Completion(text=emitted, prompt_tokens=len(prompt_ids), completion_tokens=generated,
                          finish_reason=finish)
