"""The web page of `chatrl serve`, driven in a real headless Chromium against the real command:
chat (streamed, multi-turn), compare two models and vote, the votes as training data, errors
shown in the page. Screenshots go to each test's tmp folder."""

import json
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from chatrl.serve.labels import LabelStore, read_prompts
from chatrl.serve.server import create_app
from chatrl.serve.web import add_web_ui

KEY = "web-key"
PROMPTS = ["Tell me about the sea.", "What do you think of rain?", "Describe a mountain."]


@pytest.fixture(scope="module")
def second_model_path(lively_model_path, lively_factory, tmp_path_factory):
    """Another lively tiny model (other random weights), so the two sides answer differently."""
    return lively_factory(lively_model_path, tmp_path_factory.mktemp("lively-other"), seed=1)


@pytest.fixture(scope="module")
def served(lively_model_path, second_model_path, tmp_path_factory):
    """`python -m chatrl serve --compare A B --api-key K --labels FILE --prompts FILE --port 0`."""
    folder = tmp_path_factory.mktemp("labels")
    prompts = folder / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    labels = folder / "prefs.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "chatrl", "serve", "--compare", lively_model_path, second_model_path,
         "--port", "0", "--api-key", KEY, "--labels", str(labels), "--prompts", str(prompts),
         "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        banner = proc.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/v1", banner)
        assert match, f"no banner: {banner!r} {proc.stderr.read() if proc.poll() is not None else ''}"
        page_line = proc.stdout.readline()
        assert "Web page: http://127.0.0.1:" in page_line and str(labels) in page_line
        names = re.findall(r"'([^']+)'", banner.split(" at ")[0])
        yield {"url": match.group(0)[:-3], "labels": labels, "models": names, "proc": proc}
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in err, err


def wait_js(driver, script, timeout=60, message=""):
    """Wait until `return <script>` is truthy in the page; returns its value."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(
        lambda d: d.execute_script(f"return {script}"), message or script)


def fill(driver, element_id, text):
    el = driver.find_element("id", element_id)
    el.clear()
    el.send_keys(text)


def open_page(driver, url, key):
    """Load the page, type the key, connect; waits until the page is ready or shows an error."""
    driver.get(url + "/")
    fill(driver, "api-key", key)
    driver.find_element("id", "connect").click()
    wait_js(driver, "document.body.dataset.ready === '1' || !document.getElementById('error').hidden")


def text_of(driver, selector, index=0):
    """The exact textContent (Selenium's .text normalises whitespace)."""
    return driver.execute_script("return document.querySelectorAll(arguments[0])[arguments[1]].textContent",
                                 selector, index)


def error_text(driver):
    return driver.execute_script("const e = document.getElementById('error'); return e.hidden ? '' : e.textContent")


def test_chat_two_turns_streamed(served, browser, tmp_path):
    open_page(browser, served["url"], KEY)
    assert error_text(browser) == ""
    browser.find_element("id", "tab-chat").click()
    fill(browser, "temperature", "0")  # greedy: the page's answers can be checked against the API
    fill(browser, "max-tokens", "16")
    # Record what the newest answer showed each time the transcript changed: a streamed answer
    # is seen growing, piece by piece, before it is complete.
    browser.execute_script("""
        window.__seen = [];
        new MutationObserver(() => {
            const all = document.querySelectorAll('#chat-log .msg.assistant .text');
            if (all.length) window.__seen.push([all.length, all[all.length - 1].textContent]);
        }).observe(document.getElementById('chat-log'), {subtree: true, childList: true, characterData: true});""")
    turns = ["hello there", "and what about the sea?"]
    answers = []
    for i, text in enumerate(turns):
        fill(browser, "chat-input", text)
        browser.find_element("id", "chat-send").click()
        wait_js(browser, f"document.querySelectorAll('#chat-log .msg.assistant')[{i}]?.dataset.finish")
        bubble = browser.find_elements("css selector", "#chat-log .msg.assistant")[i]
        assert bubble.get_attribute("data-finish") in ("length", "stop"), error_text(browser)
        answers.append(text_of(browser, "#chat-log .msg.assistant .text", i))
    browser.save_screenshot(str(tmp_path / "chat.png"))
    assert all(answers) and error_text(browser) == ""
    for i, answer in enumerate(answers):
        partial = {text for n, text in browser.execute_script("return window.__seen") if n == i + 1}
        assert len(partial - {"", answer}) >= 1, partial  # seen part-way, not only empty then whole
        assert all(answer.startswith(t) for t in partial)
    # The second turn was answered with the first in its context: the API gives the same answer
    # for the same conversation.
    with openai.OpenAI(base_url=served["url"] + "/v1", api_key=KEY, max_retries=0, timeout=60) as c:
        model = browser.find_element("id", "chat-model").get_attribute("value")
        history = [{"role": "user", "content": turns[0]}, {"role": "assistant", "content": answers[0]},
                   {"role": "user", "content": turns[1]}]
        expected = c.chat.completions.create(model=model, messages=history, temperature=0, max_tokens=16)
    assert answers[1] == expected.choices[0].message.content
    # Reset clears the conversation.
    browser.find_element("id", "chat-reset").click()
    assert browser.find_elements("css selector", "#chat-log .msg") == []


def test_compare_vote_three_times_then_train_rm(served, browser, tmp_path):
    open_page(browser, served["url"], KEY)
    assert error_text(browser) == ""
    # --prompts opens the Compare tab on the first unlabelled prompt of the session.
    assert browser.find_element("id", "panel-compare").is_displayed()
    assert browser.find_element("id", "cmp-prompt").get_attribute("value") == PROMPTS[0]
    assert "prompt 1 of 3" in browser.find_element("id", "session-text").text
    fill(browser, "max-tokens", "16")
    a, b = served["models"]
    assert [browser.find_element("id", "cmp-model-a").get_attribute("value"),
            browser.find_element("id", "cmp-model-b").get_attribute("value")] == [a, b]  # --compare A B

    shown = []
    for i, verdict in enumerate(["left", "right", "left"]):
        if i == 0:
            browser.find_element("id", "cmp-go").click()
        else:
            browser.find_element("id", "cmp-next").click()  # the next prompt, generated at once
        wait_js(browser, "!document.getElementById('vote-left').disabled || !document.getElementById('error').hidden")
        assert error_text(browser) == ""
        if i == 0:
            names = [el.text for el in browser.find_elements("css selector", ".side .name")]
            assert names == ["(name hidden until you vote)"] * 2  # blind by default
            browser.save_screenshot(str(tmp_path / "compare-before-vote.png"))
        left, right = text_of(browser, "#cmp-left .answer"), text_of(browser, "#cmp-right .answer")
        browser.find_element("id", f"vote-{verdict}").click()
        wait_js(browser, "document.getElementById('vote-result').textContent.startsWith('Recorded')")
        names = [el.text for el in browser.find_elements("css selector", ".side .name")]
        assert sorted(names) == sorted([a, b])  # revealed after the vote
        shown.append((PROMPTS[i], verdict, names, left, right))
    browser.save_screenshot(str(tmp_path / "compare-after-votes.png"))
    assert browser.find_element("id", "label-count").get_attribute("data-pairs") == "3"
    assert "3 labelled" in browser.find_element("id", "session-text").text

    rows = [json.loads(line) for line in served["labels"].read_text().splitlines()]
    assert len(rows) == 3
    for row, (prompt, verdict, names, left, right) in zip(rows, shown):
        chosen, rejected = (0, 1) if verdict == "left" else (1, 0)
        assert row["prompt"] == prompt and row["verdict"] == verdict
        assert row["chosen"] == (left, right)[chosen] and row["rejected"] == (left, right)[rejected]
        assert row["chosen_model"] == names[chosen] and row["rejected_model"] == names[rejected]
        assert row["blind"] is True and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", row["time"])

    # The file is training data as it is: `chatrl rm --data-path FILE` trains on it (all of it
    # in step 2: --data_split 0,1,0).
    out = tmp_path / "rm"
    run = subprocess.run(
        [sys.executable, "-m", "chatrl", "rm", "--model_name_or_path", "tiny", "--max_seq_len", "128",
         "--progress", "false", "--enable_tensorboard", "false", "--data-path", str(served["labels"]),
         "--data_split", "0,1,0", "--max_steps", "2", "--per_device_train_batch_size", "1",
         "--output_dir", str(out)],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "rm: 2 training pairs, 1 eval pairs" in run.stderr + run.stdout
    assert (out / "model" / "config.json").exists()


def test_wrong_api_key_is_shown_in_the_page(served, browser, tmp_path):
    browser.get(served["url"] + "/")
    wait_js(browser, "!document.getElementById('error').hidden")  # no key yet: the page asks for one
    assert "needs an API key" in error_text(browser)
    open_page(browser, served["url"], "not-the-key")
    browser.save_screenshot(str(tmp_path / "wrong-key.png"))
    text = error_text(browser)
    assert text.startswith("Not authorised (401)") and "the API key is not valid" in text
    assert "bad" in browser.find_element("id", "api-key").get_attribute("class")
    assert browser.find_element("id", "status").text == "not connected"


class FailingModel:
    """Fails on the prompt "boom" after one piece, like a model that runs out of memory."""

    template = "chat"

    def stream(self, messages, **settings):
        from chatrl.serve.generation import Completion

        def gen():
            yield "partial "
            if messages[-1]["content"] == "boom":
                raise RuntimeError("simulated failure")
            return Completion("partial", 1, 1, "stop")
        return gen()


def test_model_failure_is_shown_in_the_page(live_server, browser, tmp_path):
    app = add_web_ui(create_app(FailingModel(), "failing"), api_key=None, labels=tmp_path / "p.jsonl")
    with live_server(app) as srv:
        browser.get(srv.url + "/")
        wait_js(browser, "document.body.dataset.ready === '1'")
        fill(browser, "chat-input", "boom")
        browser.find_element("id", "chat-send").click()
        wait_js(browser, "!document.getElementById('error').hidden")
        browser.save_screenshot(str(tmp_path / "model-failure.png"))
        assert "The model failed" in error_text(browser) and "simulated failure" in error_text(browser)
        bubble = browser.find_element("css selector", "#chat-log .msg.assistant")
        assert "error" in bubble.get_attribute("class")
        # The failed turn is taken back and its text returned to the input, ready to resend.
        assert browser.find_element("id", "chat-input").get_attribute("value") == "boom"


# ---------------------------------------------------------------------------------------------
# The label files, through the HTTP routes (no browser needed)

def vote_body(i, verdict="left", size=0):
    pad = "x" * size
    return {"prompt": f"prompt {i}", "verdict": verdict,
            "left": {"model": "a", "text": f"left answer {i} {pad}"},
            "right": {"model": "b", "text": f"right answer {i} {pad}"}}


@pytest.fixture()
def label_server(live_server, chat_model, tmp_path):
    app = add_web_ui(create_app(chat_model, "m", api_key=KEY), api_key=KEY, labels=tmp_path / "prefs.jsonl")
    with live_server(app) as srv:
        yield srv, tmp_path / "prefs.jsonl"


def test_concurrent_votes_are_whole_rows(label_server):
    srv, path = label_server
    n = 8
    start = threading.Barrier(n, timeout=30)

    def one(i):
        start.wait()
        # 256 KiB answers: far more than one pipe/page buffer, so torn writes would show.
        return httpx.post(srv.url + "/ui/votes", json=vote_body(i, size=256 * 1024), timeout=60,
                          headers={"Authorization": f"Bearer {KEY}"})

    with ThreadPoolExecutor(n) as pool:
        responses = list(pool.map(one, range(n)))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert sorted(r.json()["pairs"] for r in responses) == list(range(1, n + 1))
    lines = path.read_text().splitlines()
    assert len(lines) == n
    rows = sorted((json.loads(line) for line in lines), key=lambda r: r["prompt"])
    for i, row in enumerate(rows):
        assert row == {**row, **{"prompt": f"prompt {i}", "chosen": vote_body(i, size=256 * 1024)["left"]["text"],
                                 "rejected": vote_body(i, size=256 * 1024)["right"]["text"]}}


def test_ties_go_beside_and_errors_are_clear(label_server):
    srv, path = label_server
    auth = {"Authorization": f"Bearer {KEY}"}
    post = lambda body, headers=auth: httpx.post(srv.url + "/ui/votes", json=body, headers=headers, timeout=30)  # noqa: E731
    assert post(vote_body(0, "right")).json() == {"pairs": 1, "ties": 0}
    assert post(vote_body(1, "tie")).json() == {"pairs": 1, "ties": 1}
    assert post(vote_body(2, "both_bad")).json() == {"pairs": 1, "ties": 2}
    ties = [json.loads(line) for line in (path.parent / "prefs.ties.jsonl").read_text().splitlines()]
    assert [t["verdict"] for t in ties] == ["tie", "both_bad"] and ties[0]["answer_a"] == "left answer 1 "
    pair = json.loads(path.read_text())
    assert pair["chosen"] == "right answer 0 " and pair["chosen_model"] == "b" and pair["rejected_model"] == "a"

    r = post(vote_body(3), headers={})
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    empty = vote_body(4)
    empty["right"]["text"] = "  "
    r = post(empty)
    assert r.status_code == 400 and "rejected answer (from b) is empty" in r.json()["error"]["message"]
    r = post({**vote_body(5), "verdict": "maybe"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "verdict"
    got = httpx.get(srv.url + "/ui/votes/download", headers=auth, timeout=30)
    assert got.status_code == 200 and got.text == path.read_text()
    assert httpx.get(srv.url + "/ui/config", timeout=30).json()["auth"] is True  # no key needed
    assert LabelStore(path).counts() == {"pairs": 1, "ties": 2}  # a restarted server counts on


def test_system_prompt_is_kept_in_chatrl_format(tmp_path):
    from chatrl.data.sources import load_source

    store = LabelStore(tmp_path / "p.jsonl")
    store.add("Rain?", "Be kind.", {"model": "a", "text": "Rain is lovely."}, {"model": "b", "text": "no"}, "left")
    store.add("Sea?", None, {"model": "a", "text": "meh"}, {"model": "b", "text": "The sea is grand."}, "right")
    store.add("Dogs?", None, {"model": "a", "text": "Dogs!"}, {"model": "b", "text": "bad"}, "left")
    data = load_source(str(tmp_path / "p.jsonl"))
    rows = list(data.train) + list(data.eval)
    assert data.pairwise and len(rows) == 3
    rain = next(r for r in rows if r["chosen"] == "Rain is lovely.")
    assert rain["messages"] == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Rain?"}]


def test_prompts_file_formats(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "one"}\n{"prompt": [{"role": "user", "content": "two"}]}\n')
    assert read_prompts(tmp_path / "p.jsonl") == ["one", "two"]
    (tmp_path / "bad.jsonl").write_text('{"text": "one"}\n')
    from chatrl.errors import ChatRLError

    with pytest.raises(ChatRLError, match="row 1 has no text 'prompt' field"):
        read_prompts(tmp_path / "bad.jsonl")
    with pytest.raises(ChatRLError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")


class HeldModel:
    """Answers only once `release` is set, so the test can fill the queue."""

    template = "chat"

    def __init__(self):
        self.started, self.release = threading.Event(), threading.Event()

    def stream(self, messages, **settings):
        from chatrl.serve.generation import Completion

        def gen():
            self.started.set()
            assert self.release.wait(60), "test never released the model"
            yield "ok"
            return Completion("ok", 1, 1, "stop")
        return gen()


def test_full_queue_is_shown_in_the_page(live_server, browser, tmp_path):
    model = HeldModel()
    app = add_web_ui(create_app(model, "held", max_queue=1), api_key=None, labels=tmp_path / "p.jsonl")
    body = {"messages": [{"role": "user", "content": "hi"}]}
    with live_server(app) as srv, ThreadPoolExecutor(2) as pool:
        browser.get(srv.url + "/")
        wait_js(browser, "document.body.dataset.ready === '1'")
        running = pool.submit(httpx.post, srv.url + "/v1/chat/completions", json=body, timeout=60)
        assert model.started.wait(30)
        waiting = pool.submit(httpx.post, srv.url + "/v1/chat/completions", json=body, timeout=60)
        wait_js(browser, "fetch('/health').then(r => r.json()).then(h => h.queued >= 1)")
        fill(browser, "chat-input", "one more")
        browser.find_element("id", "chat-send").click()
        wait_js(browser, "!document.getElementById('error').hidden")
        browser.save_screenshot(str(tmp_path / "queue-full.png"))
        assert error_text(browser).startswith("Server busy (503): the server is busy")
        model.release.set()
        assert running.result(60).status_code == 200 and waiting.result(60).status_code == 200


class EndlessModel:
    """Talks until the server closes its generator (the Stop button, via the dropped request)."""

    template = "chat"

    def __init__(self):
        self.closed = threading.Event()

    def stream(self, messages, **settings):
        def gen():
            try:
                while True:
                    time.sleep(0.02)
                    yield "word "
            finally:
                self.closed.set()
        return gen()


def test_stop_button_ends_the_answer(live_server, browser, tmp_path):
    model = EndlessModel()
    app = add_web_ui(create_app(model, "endless"), api_key=None, labels=tmp_path / "p.jsonl")
    with live_server(app) as srv:
        browser.get(srv.url + "/")
        wait_js(browser, "document.body.dataset.ready === '1'")
        fill(browser, "chat-input", "go on")
        browser.find_element("id", "chat-send").click()
        wait_js(browser, "document.querySelector('#chat-log .msg.assistant .text')?.textContent.startsWith('word word')")
        browser.find_element("id", "chat-stop").click()
        wait_js(browser, "document.querySelector('#chat-log .msg.assistant')?.dataset.finish === 'stopped'")
        assert model.closed.wait(30), "the server kept generating after Stop"
        text = text_of(browser, "#chat-log .msg.assistant .text")
        assert text.startswith("word word") and text.endswith("[stopped]") and error_text(browser) == ""
        assert not browser.find_element("id", "chat-send").get_attribute("disabled")  # ready again
