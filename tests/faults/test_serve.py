"""The server under bad input and load: each class gets its status code, and the server still
answers a good request afterwards (the one generation worker is never lost).

Classes: wrong or missing key (401), malformed bodies and bad parameters (400), a lone surrogate
in a message (400, naming the field), bodies over --max-request-bytes with or without a
Content-Length (413, before the body is parsed), 30 concurrent clients against a queue of 2
(200 or 503, nothing else), a client that hangs up mid-stream (the worker is freed).
The model is the lively tiny model of tests/unit/serve; the queue test uses that folder's
SlowModel so that exactly which requests wait is deterministic.
"""

from __future__ import annotations

import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from chatrl.serve.server import create_app

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "serve"))
from test_serve_server import SlowModel  # noqa: E402

KEY = "fault-key"
LIMIT = 64 * 1024
AUTH = {"Authorization": f"Bearer {KEY}"}
GOOD = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4,
        "temperature": 0}


@pytest.fixture(scope="module")
def url(chat_model, live_server):
    app = create_app(chat_model, "lively", api_key=KEY, max_queue=4, max_request_bytes=LIMIT)
    with live_server(app) as srv:
        yield srv.url + "/v1/chat/completions"


def post(url, body=None, headers=AUTH, **kw):
    return httpx.post(url, json=body, headers=headers, timeout=60, **kw)


def still_serves(url):
    r = post(url, GOOD)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None, r.text


def test_keys_bodies_and_parameters(url):
    assert post(url, GOOD, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert post(url, GOOD, headers={}).status_code == 401
    for raw in (b"{not json", b"[1, 2]", b'{"messages": "hi"}', b"\xff\xfe\x00"):
        r = httpx.post(url, content=raw, headers={**AUTH, "Content-Type": "application/json"}, timeout=60)
        assert r.status_code == 400, (raw, r.text)
    for bad in ({"temperature": 5}, {"top_p": -1}, {"max_tokens": 0}, {"n": 3}, {"stop": ["a"] * 9},
                {"messages": [{"role": "user", "content": "ocean " * 600}]}):
        r = post(url, {**GOOD, **bad})
        assert r.status_code == 400 and r.json()["error"]["message"], (bad, r.text)
    still_serves(url)


def test_lone_surrogate_is_400(url):
    raw = b'{"messages": [{"role": "user", "content": "hi \\ud800 there"}], "max_tokens": 4}'
    r = httpx.post(url, content=raw, headers={**AUTH, "Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "messages[0].content" and "surrogate" in err["message"], err
    still_serves(url)


def test_oversized_bodies_are_413(url):
    big = {**GOOD, "messages": [{"role": "user", "content": "x" * (LIMIT + 1)}]}
    r = post(url, big)
    assert r.status_code == 413, r.text
    assert str(LIMIT) in r.json()["error"]["message"] and "--max-request-bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(2 * LIMIT // 4096):
            yield b" " * 4096
    r = httpx.post(url, content=chunks(), headers={**AUTH, "Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 413, r.text
    still_serves(url)


def test_request_limit_must_be_positive(chat_model):
    from chatrl.errors import ChatRLError

    with pytest.raises(ChatRLError, match="--max-request-bytes is 0"):
        create_app(chat_model, "lively", max_request_bytes=0)


def test_client_hanging_up_mid_stream_frees_the_worker(url):
    with httpx.stream("POST", url, headers=AUTH, timeout=60,
                      json={**GOOD, "max_tokens": 400, "stream": True}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    still_serves(url)


def test_thirty_clients_against_a_queue_of_two(live_server):
    model = SlowModel()
    with live_server(create_app(model, "slow", max_queue=2)) as srv:
        url = srv.url + "/v1/chat/completions"
        first = threading.Thread(target=post, args=(url, GOOD, {}))
        first.start()  # taken by the worker, which waits for `release`
        assert model.started.wait(30)
        with ThreadPoolExecutor(30) as pool:
            futures = [pool.submit(post, url, GOOD, {}) for _ in range(30)]
            for _ in range(3000):  # two wait in the queue, every other one is refused at once
                if sum(f.done() for f in futures) >= 28:
                    break
                threading.Event().wait(0.02)
            model.release.set()
            codes = sorted(f.result().status_code for f in futures)
        first.join(60)
        assert codes == [200, 200] + [503] * 28, codes
        r = post(url, GOOD, {})
        assert r.status_code == 200
