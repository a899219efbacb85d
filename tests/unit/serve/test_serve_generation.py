"""ChatModel: greedy decoding matches Transformers, streaming equals non-streaming, stops cut exactly."""

from types import SimpleNamespace

import pytest
import torch

from chatrl.errors import ChatRLError
from chatrl.serve.generation import ChatModel, Completion, check_messages, check_sampling

HELLO = [{"role": "user", "content": "Tell me about the ocean."}]


def collect(gen):
    """Pieces a stream yields, and the Completion it returns."""
    pieces = []
    while True:
        try:
            pieces.append(next(gen))
        except StopIteration as done:
            return pieces, done.value


def test_greedy_matches_transformers_generate(chat_model):
    ids = chat_model.encode(HELLO)
    out = chat_model.model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=24)
    expected = chat_model.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()
    got = chat_model.generate(HELLO, max_new_tokens=24, temperature=0)
    assert expected and got.text == expected
    assert got == Completion(expected, len(ids), 24, "length")


def test_stream_joins_to_generate_and_answers_differ(chat_model):
    texts = set()
    for prompt in ["hello", "What is 2+2?", "Describe a mountain.", "b"]:
        msgs = [{"role": "user", "content": prompt}]
        full = chat_model.generate(msgs, max_new_tokens=20, temperature=0)
        pieces, done = collect(chat_model.stream(msgs, max_new_tokens=20, temperature=0))
        assert "".join(pieces) == full.text == done.text
        assert all(pieces) and done.finish_reason == full.finish_reason
        texts.add(full.text)
    assert len(texts) == 4  # the fixture model answers each prompt differently


def test_stop_string_cuts_answer(chat_model):
    full = chat_model.generate(HELLO, max_new_tokens=24, temperature=0).text
    stop = full[8:11]
    assert stop.strip() and full.find(stop) == 8
    got = chat_model.generate(HELLO, max_new_tokens=24, temperature=0, stop=[stop])
    assert got.text == full[:8].strip() and got.finish_reason == "stop"
    assert got.completion_tokens < 24


def test_seeded_sampling_is_reproducible(chat_model):
    a = chat_model.generate(HELLO, max_new_tokens=16, temperature=1.0, top_p=0.95, seed=7)
    b = chat_model.generate(HELLO, max_new_tokens=16, temperature=1.0, top_p=0.95, seed=7)
    others = {chat_model.generate(HELLO, max_new_tokens=16, temperature=1.0, seed=s).text for s in range(3)}
    assert a == b and len(others) > 1


def test_render_uses_the_recorded_template(chat_model):
    assert chat_model.template == "chat"  # from chatrl.json
    assert chat_model.render("hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


class ScriptedLM(torch.nn.Module):
    """A stand-in model that emits a fixed token sequence (then EOS), one token per call."""

    def __init__(self, script, vocab, eos):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # so ChatModel can find the device
        self.script, self.vocab = list(script) + [eos], vocab
        self.config = SimpleNamespace(eos_token_id=eos, max_position_embeddings=512)
        self.generation_config = None
        self.closed_at = None

    def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=True):
        step = 0 if past_key_values is None else past_key_values + 1  # the "cache" counts calls
        logits = torch.zeros(1, input_ids.shape[1], self.vocab)
        logits[0, -1, self.script[min(step, len(self.script) - 1)]] = 1.0
        return SimpleNamespace(logits=logits, past_key_values=step)


def scripted(tokenizer, text, template):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ChatModel(ScriptedLM(ids, len(tokenizer), tokenizer.eos_token_id), tokenizer, template)


def test_plain_template_stops_at_next_human_turn(tiny_tokenizer):
    model = scripted(tiny_tokenizer, " Hello there, friend.\n\nHuman: and more\n\nAssistant: x", "plain")
    pieces, done = collect(model.stream("hi", max_new_tokens=64, temperature=0))
    assert "".join(pieces) == "Hello there, friend." == done.text
    assert done.finish_reason == "stop"
    assert not any("Human" in p or p.endswith("\n") for p in pieces)  # nothing taken back


def test_multibyte_characters_stream_whole(tiny_tokenizer):
    text = "  héllo ☃ naïve 日本  "
    model = scripted(tiny_tokenizer, text, "chat")
    pieces, done = collect(model.stream("hi", max_new_tokens=64, temperature=0))
    assert "".join(pieces) == text.strip() == done.text
    assert not any("\ufffd" in p for p in pieces)
    assert done.finish_reason == "stop"  # EOS
    assert model.generate("hi", max_new_tokens=3, temperature=0).finish_reason == "length"


def test_too_long_conversation_is_a_clear_error(chat_model):
    with pytest.raises(ChatRLError, match="context holds 512"):
        chat_model.stream([{"role": "user", "content": "ocean " * 600}])


@pytest.mark.parametrize("bad, match", [
    ([], "non-empty list"),
    ([{"role": "robot", "content": "x"}], "role 'robot'"),
    ([{"content": "x"}], "needs a 'role'"),
    ([{"role": "user", "content": 3}], "content of type int"),
])
def test_bad_messages(bad, match):
    with pytest.raises(ChatRLError, match=match):
        check_messages(bad)


@pytest.mark.parametrize("args, match", [
    ((0, 0.7, 0.9), "max_new_tokens is 0"),
    ((8, -1, 0.9), "temperature is -1"),
    ((8, 0.7, 0), "top_p is 0"),
])
def test_bad_sampling_settings(args, match):
    with pytest.raises(ChatRLError, match=match):
        check_sampling(*args)
    assert check_sampling(8, 0, 1) is False and check_sampling(8, 0.5, 1) is True
