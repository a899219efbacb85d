"""DeepSpeed-Chat's --data-split per step, blending, weights, and their errors."""

import json
from collections import Counter

import pytest

from chatrl.data import build_step_data, parse_data_split
from chatrl.data.split import scale_indices, slice_bounds, step_indices
from chatrl.errors import ConfigError, DataError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def pairwise_file(tmp_path):
    rows = [{"prompt": f"P{i}?", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(100)]
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


@pytest.fixture
def sft_file(tmp_path):
    rows = [{"prompt": f"S{i}?", "response": f"answer {i}"} for i in range(40)]
    return write_jsonl(tmp_path / "sft.jsonl", rows)


def prompts(ds):
    return [r["messages"][-1]["content"] for r in ds]


def test_parse_data_split():
    assert parse_data_split("2,4,4") == pytest.approx((0.2, 0.4, 0.4))
    assert parse_data_split("1, 0, 0") == (1.0, 0.0, 0.0)
    assert parse_data_split([10, 0, 10]) == (0.5, 0.0, 0.5)


@pytest.mark.parametrize("text, message", [
    ("2,4", '--data-split "2,4" has 2 parts; it needs 3'),
    ("1,2,3,4", "has 4 parts"),
    ("2,x,4", "not a number"),
    ("2,-1,4", "negative"),
    ("0,0,0", "sum to 0"),
    ("2,inf,4", "infinite"),
])
def test_bad_data_split(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_data_split(text)


def test_slices_are_disjoint_contiguous_and_proportional():
    assert slice_bounds(100, (0.2, 0.4, 0.4)) == [(0, 20), (20, 60), (60, 100)]
    assert slice_bounds(7, (1 / 3, 1 / 3, 1 / 3)) == [(0, 2), (2, 5), (5, 7)]
    parts = [step_indices(100, (0.2, 0.4, 0.4), s, seed=3) for s in (1, 2, 3)]
    assert [len(p) for p in parts] == [20, 40, 40]
    assert sorted(parts[0] + parts[1] + parts[2]) == list(range(100))
    assert step_indices(100, (0.2, 0.4, 0.4), 2, seed=3) == parts[1]
    assert step_indices(100, (0.2, 0.4, 0.4), 2, seed=4) != parts[1]


def test_step_data_slices_are_disjoint_and_deterministic(pairwise_file):
    steps = {s: build_step_data([pairwise_file], "2,4,4", s, seed=7) for s in (1, 2, 3)}
    trains = {s: set(prompts(d.train)) for s, d in steps.items()}
    evals = {s: set(prompts(d.eval)) for s, d in steps.items()}
    # 100 rows -> 90 train + 10 eval (9:1), cut 2:4:4.
    assert [len(trains[s]) for s in (1, 2, 3)] == [18, 36, 36]
    assert [len(evals[s]) for s in (1, 2, 3)] == [2, 4, 4]
    assert not (trains[1] & trains[2] or trains[1] & trains[3] or trains[2] & trains[3])
    assert not (evals[1] & evals[2] or evals[2] & evals[3])
    assert not set().union(*trains.values()) & set().union(*evals.values())
    again = build_step_data([pairwise_file], "2,4,4", 2, seed=7)
    assert list(again.train) == list(steps[2].train)
    other = build_step_data([pairwise_file], "2,4,4", 2, seed=8)
    assert set(prompts(other.train)) != trains[2]
    # Step 3 keeps the prompts only.
    assert steps[3].train.column_names == ["messages"]
    assert steps[2].stats["sources"][pairwise_file]["train_rows"] == 36


def test_zero_share_for_the_step_is_an_error(pairwise_file):
    with pytest.raises(ConfigError, match=r'--data-split "10,0,0" gives step 2 \(reward model\) a share of 0'):
        build_step_data([pairwise_file], "10,0,0", 2)
    with pytest.raises(ConfigError, match="has 2 parts"):
        build_step_data([pairwise_file], "2,4", 1)
    with pytest.raises(ConfigError, match="use 1 \\(SFT\\), 2"):
        build_step_data([pairwise_file], "2,4,4", 4)


def test_sft_only_sources_go_wholly_to_step_1(pairwise_file, sft_file):
    s1 = build_step_data([pairwise_file], "2,4,4", 1, sft_only_data_path=[sft_file])
    names = prompts(s1.train) + prompts(s1.eval)
    assert sum(n.startswith("S") for n in names) == 40
    assert len(s1.train) == 18 + 36 and len(s1.eval) == 2 + 4
    s2 = build_step_data([pairwise_file], "2,4,4", 2, sft_only_data_path=[sft_file])
    assert not any(n.startswith("S") for n in prompts(s2.train))
    # Step 1 may take nothing from data_path when SFT-only data is given.
    only = build_step_data([pairwise_file], "0,5,5", 1, sft_only_data_path=[sft_file])
    assert len(only.train) == 36 and all(n.startswith("S") for n in prompts(only.train))


def test_step_2_needs_pairwise_sources(pairwise_file, sft_file):
    with pytest.raises(DataError, match=r"needs pairwise data .* none of --data-path .*sft.jsonl has rejected"):
        build_step_data([sft_file], "2,4,4", 2)
    mixed = build_step_data([pairwise_file, sft_file], "2,4,4", 2)
    assert all(r["rejected"] is not None for r in mixed.train)
    assert mixed.stats["sources"][sft_file]["used"] is False


def test_step_2_drops_rows_without_rejected(tmp_path):
    rows = [{"prompt": f"P{i}?", "chosen": "c", **({"rejected": "r"} if i % 2 else {})} for i in range(40)]
    f = write_jsonl(tmp_path / "half.jsonl", rows)
    s2 = build_step_data([f], "0,1,0", 2, seed=1)
    assert all(r["rejected"] == "r" for r in s2.train) and len(s2.train) + len(s2.eval) == 20
    assert s2.stats["sources"][f]["dropped_no_rejected"] == 20


def test_blending_concatenates_and_shuffles(pairwise_file, tmp_path):
    other = write_jsonl(tmp_path / "other.jsonl",
                        [{"prompt": f"O{i}?", "chosen": "c", "rejected": "r"} for i in range(50)])
    b = build_step_data([pairwise_file, other], "1,1,1", 1, seed=0)
    names = prompts(b.train)
    assert Counter(n[0] for n in names) == {"P": 30, "O": 15}
    assert names != sorted(names, key=lambda n: n[0] == "O")  # interleaved, not concatenated
    assert list(build_step_data([pairwise_file, other], "1,1,1", 1, seed=0).train) == list(b.train)


def test_weights_scale_each_source(pairwise_file, tmp_path):
    other = write_jsonl(tmp_path / "other.jsonl",
                        [{"prompt": f"O{i}?", "chosen": "c", "rejected": "r"} for i in range(50)])
    b = build_step_data([pairwise_file, other], "1,1,1", 1, seed=0, weights=[0.5, 2.0])
    counts = Counter(n[0] for n in prompts(b.train))
    assert counts == {"P": 15, "O": 30}
    o_counts = Counter(n for n in prompts(b.train) if n[0] == "O")
    assert set(o_counts.values()) == {2}  # weight 2.0: every row twice
    assert len(set(n for n in prompts(b.train) if n[0] == "P")) == 15  # 0.5: a half, no repeats
    again = build_step_data([pairwise_file, other], "1,1,1", 1, seed=0, weights=[0.5, 2.0])
    assert list(again.train) == list(b.train)
    assert len(b.eval) == 3 + 2  # eval rows are not weighted: a third of 10 and of 5 eval rows
    assert b.stats["sources"][other]["weight"] == 2.0


def test_scale_indices():
    assert scale_indices(4, 2.0, 0) == [0, 1, 2, 3, 0, 1, 2, 3]
    half = scale_indices(10, 0.5, 0)
    assert len(half) == 5 and len(set(half)) == 5
    assert len(scale_indices(10, 1.5, 0)) == 15


@pytest.mark.parametrize("weights, message", [
    ([1.0], "has 1 value"),
    ([1.0, 0.0], "not a positive number"),
    ([1.0, -1.0], "not a positive number"),
])
def test_bad_weights(pairwise_file, tmp_path, weights, message):
    other = write_jsonl(tmp_path / "o.jsonl", [{"prompt": "x", "chosen": "y"}] * 3)
    with pytest.raises(ConfigError, match=message):
        build_step_data([pairwise_file, other], "2,4,4", 1, weights=weights)


def test_no_training_rows_is_an_error(tmp_path):
    f = write_jsonl(tmp_path / "tiny.jsonl", [{"prompt": "x", "chosen": "y", "rejected": "z"}] * 2)
    with pytest.raises(DataError, match="got no training rows"):
        build_step_data([f], "98,1,1", 3)


def test_demo_per_step():
    s3 = build_step_data(["demo"], "2,4,4", 3)
    assert len(s3.train) == 240 and len(s3.eval) == 40
