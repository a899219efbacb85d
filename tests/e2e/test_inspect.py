"""Step 3's rollout log and `chatrl inspect`: after a tiny PPO run, one self-contained HTML file
that opens offline in headless Chromium and shows each token with its advantage."""

import json
import math
import subprocess
import sys

import pytest

from ppo_helpers import PPO_FAST, child_env, run

VOCAB = 512  # at least the tiny model's vocabulary (the bound of an entropy)


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo-rollouts")
    run([sys.executable, "-m", "chatrl", "ppo", "--actor_model_name_or_path", "tiny",
         "--critic_model_name_or_path", "tiny", "--allow-untrained-reward-head", *PPO_FAST, "--max_steps", "3",
         "--log-rollouts-interval", "2", "--output_dir", out], timeout=600)
    return out


def test_rollout_log(ppo_run):
    files = sorted(p.name for p in (ppo_run / "rollouts").iterdir())
    assert files == ["iter_00002.jsonl"]  # every 2nd of 3 iterations
    rows = [json.loads(line) for line in (ppo_run / "rollouts" / files[0]).read_text().splitlines()]
    assert len(rows) == 4 and [r["index"] for r in rows] == [0, 1, 2, 3]  # one generation batch
    for r in rows:
        n = r["length"]
        assert 1 <= n <= 16 and r["iteration"] == 2 and r["prompt"]
        for key in ("token_ids", "tokens", "logprob", "ref_logprob", "kl", "value", "advantage", "reward_t",
                    "entropy"):
            assert len(r[key]) == n, key
        assert all(0 <= h <= math.log(VOCAB) + 1e-4 for h in r["entropy"]) and max(r["entropy"]) > 0.1
        assert r["rewards"] == {"model": r["reward"]}  # the reward model is the one source
        assert all(abs(k - (lp - ref)) < 2e-5 for k, lp, ref in zip(r["kl"], r["logprob"], r["ref_logprob"]))
        assert abs(sum(r["reward_t"]) - r["return_total"]) < 1e-4
        assert r["reward_t"][-1] - (-0.1 * r["kl"][-1]) == pytest.approx(r["reward"], abs=1e-3)  # score at the end
    # After two updates the actor has moved away from the reference: KL is not all zero.
    assert any(k != 0 for r in rows for k in r["kl"])


def test_inspect_html_offline_in_chromium(ppo_run, browser, tmp_path):
    page = tmp_path / "inspect.html"
    proc = subprocess.run([sys.executable, "-m", "chatrl", "inspect", str(ppo_run), "--html", str(page)],
                          capture_output=True, text=True, timeout=120, env=child_env())
    assert proc.returncode == 0, proc.stderr
    html = page.read_text()
    assert "<script src" not in html and "<link" not in html and "http://" not in html.replace(
        "http://www.w3.org/2000/svg", "")  # self-contained: nothing to fetch
    rows = [json.loads(line) for line in (ppo_run / "rollouts" / "iter_00002.jsonl").read_text().splitlines()]

    browser.get(page.as_uri())
    answers = browser.find_elements("css selector", "#answers .answer")
    assert len(answers) == len(rows)
    rewards = [float(a.get_attribute("data-reward")) for a in answers]
    assert rewards == sorted((r["reward"] for r in rows), reverse=True)  # sorted by reward
    best = max(rows, key=lambda r: r["reward"])
    spans = answers[0].find_elements("css selector", ".tok")
    assert [s.get_attribute("textContent") for s in spans] == best["tokens"]
    assert [float(s.get_attribute("data-advantage")) for s in spans] == best["advantage"]
    title = spans[0].get_attribute("title")
    assert "advantage" in title and f"{best['advantage'][0]:.4f}" in title and "KL" in title
    colours = {s.value_of_css_property("background-color") for s in spans}
    assert len(colours) > 1  # coloured by value, not uniform
    assert browser.find_elements("css selector", "#curve-reward polyline")  # the reward curve drawn
    browser.save_screenshot(str(tmp_path / "inspect-advantage.png"))
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element("id", "colour")).select_by_value("kl")
    browser.save_screenshot(str(tmp_path / "inspect-kl.png"))
    assert "coloured by kl" in browser.find_element("id", "summary").text


def test_inspect_a_critic_free_run_in_chromium(browser, tmp_path):
    """GRPO logs no reference log-probs, KL or values: the page still shows every answer with
    its advantages and each reward source's score, and says there is no reference model."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say yes {i}", "answer": "yes"}) + "\n"
                               for i in range(8)))
    out = tmp_path / "grpo"
    run([sys.executable, "-m", "chatrl", "grpo", "--actor_model_name_or_path", "tiny", "--data_path",
         prompts, "--reward_fn", "exact", "format", "--num_generations", "4",
         "--per_device_generation_batch_size", "2", "--per_device_training_batch_size", "8",
         "--max_answer_seq_len", "6", "--max_steps", "1", "--log-rollouts-interval", "1",
         "--progress", "false", "--enable_tensorboard", "false", "--dtype", "fp32", "--output_dir", out],
        timeout=600)
    rows = [json.loads(line) for line in (out / "rollouts" / "iter_00001.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(set(r["rewards"]) == {"exact", "format"} and r["kl"] is None for r in rows)
    page = tmp_path / "grpo.html"
    proc = subprocess.run([sys.executable, "-m", "chatrl", "inspect", str(out), "--html", str(page)],
                          capture_output=True, text=True, timeout=120, env=child_env())
    assert proc.returncode == 0, proc.stderr
    browser.get(page.as_uri())
    answers = browser.find_elements("css selector", "#answers .answer")
    assert len(answers) == 8
    head = answers[0].find_element("css selector", ".head").text
    assert "no reference model" in head and "exact" in head and "format" in head, head
    assert browser.find_element("id", "curve-kl").text == "no data"  # no KL curve drawn at 0
    best = max(rows, key=lambda r: r["reward"])
    spans = answers[0].find_elements("css selector", ".tok")
    assert [float(s.get_attribute("data-advantage")) for s in spans] == best["advantage"]
    browser.save_screenshot(str(tmp_path / "inspect-grpo.png"))


def test_inspect_without_rollouts_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "chatrl", "inspect", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env=child_env())
    assert proc.returncode == 2
    assert "has no rollout log" in proc.stderr and "--log-rollouts-interval" in proc.stderr
