"""Reward sources: built-in verifiers, user functions (TRL's signature), the remote server, the
weighted mix, and every way a reward can go wrong (one-line errors, or zeroed and counted)."""

import math
import socket

import pytest
import torch

from chatrl.errors import ChatRLError, ConfigError
from chatrl.rewards import RewardError, ScoringBatch, score_batch
from chatrl.rewards.functions import FunctionReward, build_reward_sources, load_reward_function
from chatrl.rewards.remote import RemoteReward, serve_reward_function
from chatrl.rewards.verifiers import builtin_reward, final_answer, final_number


def batch(texts, answers=None, **extra):
    cols = {} if answers is None else {"answer": list(answers)}
    cols.update({k: list(v) for k, v in extra.items()})
    return ScoringBatch(prompts=[f"q{i}" for i in range(len(texts))], completions=list(texts),
                        texts=list(texts), columns=cols)


def test_final_answer_and_number():
    assert final_number("so 3 + 4 = 7\n#### 1,234") == 1234.0
    assert final_number("we get \\boxed{12} apples, not 13") == 12.0
    assert final_number("5 x 3 = 15. The answer is 17.") == 17.0
    assert final_number("first 3, then 4, so 9 in all") == 9.0
    assert final_number("no digits") is None
    # The number right after the mark, not a later one: listing numbers after it earns nothing.
    assert final_number("The answer is 25, because 4 cookies together.") == 25.0
    assert final_number("The answer is 3 + 4 = 7 or 9") == 3.0
    assert final_number("#### 12 (not 13)") == 12.0
    assert final_number("The answer is: none.\n3 + 4 = 7") == 7.0  # no number after the mark
    assert final_answer("x \\boxed{\\frac{1}{2}} y") == "\\frac{1}{2}"
    assert final_answer("The answer is: Paris.\nBye") == "Paris."


def test_numeric_exact_format_and_math_verifiers():
    num = builtin_reward("numeric")
    assert num(batch(["The answer is 17.", "It is 16", "#### 17.0", "none"], ["17", "17", 17, "17"])) \
        == [1.0, 0.0, 1.0, 0.0]
    ex = builtin_reward("exact")
    assert ex(batch(["  Yes.", "yes!", "no", "The answer is YES"], ["yes"] * 4)) == [1.0, 1.0, 0.0, 1.0]
    fmt = builtin_reward("format", format_pattern=r"^<a>.*</a>$")
    assert fmt(batch(["<a>1</a>", "1"])) == [1.0, 0.0]
    assert builtin_reward("format")(batch(["#### 3", "3"])) == [1.0, 0.0]  # default: a stated answer
    m = builtin_reward("math")
    assert m(batch(["so the result is $\\frac{1}{2}$", "it is 0.5", "it is 0.6"], ["0.5"] * 3)) \
        == [1.0, 1.0, 0.0]
    assert m.is_correctness and num.is_correctness and not fmt.is_correctness


def test_verifier_without_the_answer_column_names_it():
    with pytest.raises(ConfigError, match="'answer' column.*columns: topic.*--answer-column"):
        builtin_reward("numeric")(batch(["1"], None, topic=["x"]))


def test_weighted_mix_per_source_and_accuracy():
    srcs, w = build_reward_sources(["numeric", "format"], weights=[2.0, 0.5])
    sc = score_batch(srcs, w, batch(["#### 4", "4", "#### 5"], ["4", "4", "4"]))
    assert sc.per_source["numeric"].tolist() == [1.0, 1.0, 0.0]
    assert sc.per_source["format"].tolist() == [1.0, 0.0, 1.0]
    assert sc.total.tolist() == pytest.approx([2.5, 2.0, 0.5])
    assert sc.accuracy.tolist() == [1.0, 1.0, 0.0]
    with pytest.raises(ConfigError, match="--reward-weights has 1 value.*2 reward source"):
        build_reward_sources(["numeric", "format"], weights=[1.0])
    with pytest.raises(ConfigError, match="no reward"):
        build_reward_sources([])


def test_user_function_gets_trl_arguments_and_columns():
    seen = {}

    def fn(prompts, completions, answer, **kwargs):
        seen.update(prompts=prompts, completions=completions, answer=answer, **kwargs)
        return [float(c == a) for c, a in zip(completions, answer)]

    src = FunctionReward(fn, "fn")
    b = batch(["4", "5"], ["4", "4"], topic=["sum", "sum"])
    assert src(b) == [1.0, 0.0]
    assert seen["prompts"] == ["q0", "q1"] and seen["topic"] == ["sum", "sum"]
    assert "completion_ids" in seen
    # a function without **kwargs gets only what it names
    assert FunctionReward(lambda completions: [1.0] * len(completions), "f")(b) == [1.0, 1.0]


def _fn(values):
    def fn(prompts, completions, **kw):
        return values(completions) if callable(values) else values
    return fn


def test_wrong_length_nan_and_raise_are_one_line_errors_naming_function_and_sample():
    b = batch(["a", "b", "c"])
    with pytest.raises(RewardError, match=r"reward short returned 2 values for 3 completions"):
        score_batch([FunctionReward(_fn([1.0, 2.0]), "short")], [1.0], b)
    with pytest.raises(RewardError, match=r"reward nan returned nan for sample 1 \(prompt 'q1', completion 'b'\)"):
        score_batch([FunctionReward(_fn([1.0, math.nan, 0.0]), "nan")], [1.0], b)
    with pytest.raises(RewardError, match=r"returned 'x' for sample 2"):
        score_batch([FunctionReward(_fn([1.0, 0.0, "x"]), "str")], [1.0], b)

    def boom(prompts, completions, **kw):
        if "b" in completions:
            raise KeyError("no answer for b")
        return [1.0] * len(completions)

    with pytest.raises(RewardError, match=r"reward boom raised KeyError: 'no answer for b' on sample 1 "
                                          r"\(prompt 'q1', completion 'b'\).*--skip-bad-rewards"):
        score_batch([FunctionReward(boom, "boom")], [1.0], b)
    assert issubclass(RewardError, ChatRLError)


def test_skip_bad_rewards_zeroes_and_counts():
    b = batch(["a", "b", "c"])

    def boom(prompts, completions, **kw):
        if "b" in completions:
            raise ValueError("bad")
        return [2.0] * len(completions)

    sc = score_batch([FunctionReward(boom, "boom"), FunctionReward(_fn([1.0, math.inf, 1.0]), "inf")],
                     [1.0, 1.0], b, skip_bad=True)
    assert sc.per_source["boom"].tolist() == [2.0, 0.0, 2.0] and sc.bad["boom"] == 1
    assert sc.per_source["inf"].tolist() == [1.0, 0.0, 1.0] and sc.bad["inf"] == 1
    assert sc.total.tolist() == [3.0, 0.0, 3.0]


def test_load_reward_function_from_file_and_module(tmp_path):
    f = tmp_path / "my_rewards.py"
    f.write_text("def length_reward(prompts, completions, **kw):\n"
                 "    return [float(len(c)) for c in completions]\n")
    fn = load_reward_function(f"{f}:length_reward")
    assert fn(["p"], ["abc"]) == [3.0]
    assert load_reward_function("math:sqrt") is math.sqrt
    with pytest.raises(ConfigError, match="does not exist"):
        load_reward_function(f"{tmp_path}/nope.py:f")
    with pytest.raises(ConfigError, match="has no 'missing'.*length_reward"):
        load_reward_function(f"{f}:missing")
    with pytest.raises(ConfigError, match="neither a built-in"):
        load_reward_function("numerik")


def test_remote_reward_server_and_server_down():
    def fn(prompts, completions, answer):
        return [float(c.strip() == a) for c, a in zip(completions, answer)]

    server = serve_reward_function(fn)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        src = RemoteReward(url, timeout=5)
        assert src(batch(["4", "3"], ["4", "4"])) == [1.0, 0.0]
        # a function error on the server side: an HTTP 500, reported (not retried forever)
        with pytest.raises(RewardError, match=r"HTTP 500.*missing 1 required positional argument: "
                                              r"'answer'.*fix its reward function"):
            RemoteReward(url, timeout=5, retries=1, backoff=0.01)(batch(["4"]))
    finally:
        server.shutdown()
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = RemoteReward(f"http://127.0.0.1:{port}/", timeout=2, retries=1, backoff=0.01)
    with pytest.raises(RewardError, match=rf"reward server http://127.0.0.1:{port}/ failed after 2 "
                                          r"tries \(ConnectionRefusedError.*check that it is running"):
        score_batch([down], [1.0], batch(["x"]))
    with pytest.raises(RewardError, match="not an http"):
        RemoteReward("127.0.0.1:8000")


def test_scores_are_float_tensors_for_tensor_sources():
    class T:
        name, is_correctness = "t", False

        def __call__(self, b):
            return torch.tensor([0.5, 1.5])

    sc = score_batch([T()], [2.0], batch(["a", "b"]))
    assert sc.total.dtype == torch.float32 and sc.total.tolist() == [1.0, 3.0]
