"""The demo task: deterministic data, disjoint held-out topics, and the exact judge."""

import re
from statistics import mean

import pytest

from chatrl.data import demo_dataset, demo_topic, held_out_prompts, judge
from chatrl.data.demo import (HELD_OUT_TOPICS, LUKEWARM_ADJ, NEGATIVE_WORDS, POSITIVE_WORDS, TOPICS, TRAIN_TOPICS,
                              content_words)


@pytest.fixture(scope="module")
def demo():
    return demo_dataset()


def test_sizes_schema_and_determinism(demo):
    assert len(demo["train"]) == 600 and len(demo["test"]) == 100
    assert demo["train"].column_names == ["messages", "chosen", "rejected"]
    again = demo_dataset()
    assert list(again["train"]) == list(demo["train"]) and list(again["test"]) == list(demo["test"])
    assert list(demo_dataset(seed=1)["train"]) != list(demo["train"])
    prompts = [r["messages"][0]["content"] for r in demo["train"]]
    assert len(set(prompts)) == len(prompts)  # no prompt repeats


def test_held_out_topics_are_disjoint_from_train(demo):
    train_topics = {demo_topic(r["messages"]) for r in demo["train"]}
    test_topics = {demo_topic(r["messages"]) for r in demo["test"]}
    assert train_topics <= set(TRAIN_TOPICS) and test_topics <= set(HELD_OUT_TOPICS)
    assert not train_topics & test_topics and len(test_topics) == len(HELD_OUT_TOPICS) == 16
    assert len(TOPICS) >= 80 and len(train_topics) == 80
    # Not even a content word of a held-out topic is shared with a train topic.
    train_words = set().union(*(content_words(t) for t in TRAIN_TOPICS))
    assert not train_words & set().union(*(content_words(t) for t in HELD_OUT_TOPICS))
    for p in held_out_prompts():
        assert demo_topic(p) in HELD_OUT_TOPICS
    assert len(held_out_prompts()) == 16 and held_out_prompts(3) == held_out_prompts()[:3]


def test_chosen_scores_clearly_above_rejected(demo):
    for split in ("train", "test"):
        rows = list(demo[split])
        chosen = [judge(r["messages"], r["chosen"]) for r in rows]
        rejected = [judge(r["messages"], r["rejected"]) for r in rows]
        # Measured: train 0.799 vs -0.015.
        assert mean(chosen) > 0.75 and mean(rejected) < 0.05
        assert mean(chosen) - mean(rejected) > 0.75
        # Every pair, the closest being a curt answer (one positive word) against three.
        assert all(c - r >= 0.1875 - 1e-9 for c, r in zip(chosen, rejected))


def test_answers_are_short_and_use_the_lexicons(demo):
    kinds = {"negative": 0, "neutral": 0, "lukewarm": 0, "curt": 0, "off_topic": 0}
    for r in demo["train"]:
        assert 8 <= len(r["chosen"].split()) <= 30 and 2 <= len(r["rejected"].split()) <= 30
        words = re.findall(r"[a-z]+", r["rejected"].lower())
        pos = sum(w in POSITIVE_WORDS for w in words)
        if set(words) & NEGATIVE_WORDS:
            kinds["negative"] += 1
        elif set(words) & set(LUKEWARM_ADJ):
            kinds["lukewarm"] += 1
        elif pos == 1:
            kinds["curt"] += 1
            assert len(words) <= 10
        elif pos:
            kinds["off_topic"] += 1
            assert judge(r["messages"], r["rejected"]) == judge(r["messages"], r["chosen"]) - 0.25
        else:
            kinds["neutral"] += 1
    # Mostly positive-vs-negative; some neutral, lukewarm, curt and off-topic positive answers.
    assert kinds["negative"] > 300 and min(kinds.values()) > 30, kinds


def test_judge_on_hand_written_examples():
    # pos 2 (wonderful, lovely), neg 0: sentiment 2/3; "beach" present: 0.75*2/3 + 0.25 = 0.75
    assert judge("What do you think about the beach?", "The beach is wonderful and lovely.") == pytest.approx(0.75)
    # neg 1: sentiment -1/2; "music" missing so off topic: 0.75 * -0.5 = -0.375
    assert judge("Describe jazz music in one sentence.", "Jazz is awful.") == pytest.approx(-0.375)
    # pos 1, neg 1: sentiment 0; on topic: 0.25
    assert judge([{"role": "user", "content": "How do you feel about board games?"}],
                 "Board games are fun? No: boring, but wonderful.") == pytest.approx(0.25)
    # nothing from the lexicons, off topic: 0
    assert judge("Tell me something about chess.", "I like trains.") == 0.0
    # pos 3: 0.75 * 3/4 = 0.5625, off topic (another topic)
    assert judge("What do you think about chess?", "Pizza is lovely, cozy and superb.") == pytest.approx(0.5625)
    # An unknown prompt has no topic: only sentiment counts.
    assert judge("Hello there", "wonderful") == pytest.approx(0.375)


def test_demo_topic_from_rendered_prompts():
    rendered = ("<|im_start|>user\nWhat do you think about the beach?<|im_end|>\n<|im_start|>assistant\n"
                "Lovely.<|im_end|>\n<|im_start|>user\nHow would you spend a day at the zoo?<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert demo_topic(rendered) == "the zoo"
    assert demo_topic("\n\nHuman: Describe rainy weather in one sentence.\n\nAssistant:") == "rainy weather"
    assert demo_topic("I was at the farmers market today") == "the farmers market"
    assert demo_topic("nothing here") is None
    assert content_words("the city park") == {"city", "park"}
