"""The OpenAI-compatible server, driven by the official `openai` client against real uvicorn."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from chatrl.serve.generation import Completion
from chatrl.serve.server import create_app

KEY = "test-key"
MODEL = "lively-tiny"


@pytest.fixture(scope="module")
def server(chat_model, live_server):
    app = create_app(chat_model, MODEL, api_key=KEY, max_queue=16)
    with live_server(app) as srv:
        yield srv


@pytest.fixture()
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=30) as c:
        yield c


def ask(client, prompt, **kw):
    """A greedy 16-token request unless `kw` says otherwise."""
    kw = {"temperature": 0, "max_tokens": 16, **kw}
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], **kw)


def test_models_and_health(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL] and models.data[0].object == "model"
    assert client.models.retrieve(MODEL).id == MODEL
    health = httpx.get(server.url + "/health", timeout=10).json()  # no key needed
    assert health["status"] == "ok" and health["max_queue"] == 16


def test_completion_and_stream_agree(client):
    r = ask(client, "Tell me about the ocean.")
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL
    choice = r.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    assert r.usage.completion_tokens == 16
    assert r.usage.total_tokens == r.usage.prompt_tokens + 16

    chunks = list(ask(client, "Tell me about the ocean.", stream=True,
                      stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == r.usage.total_tokens


def test_request_options(client):
    full = ask(client, "hello").choices[0].message.content
    cut = ask(client, "hello", stop=[full[5:8]])
    assert cut.choices[0].message.content == full[:5].strip() and cut.choices[0].finish_reason == "stop"
    short = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}],
                                           temperature=0, max_completion_tokens=3)
    assert short.usage.completion_tokens == 3
    a, b = (ask(client, "hello", temperature=1.0, seed=11).choices[0].message.content for _ in range(2))
    assert a == b
    with pytest.raises(openai.BadRequestError, match="one choice per request"):
        ask(client, "hello", n=2)
    with pytest.raises(openai.BadRequestError, match="context holds 512"):
        ask(client, "ocean " * 600)


def test_wrong_or_missing_api_key(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0, timeout=30) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        with pytest.raises(openai.AuthenticationError):
            ask(bad, "hello")
    r = httpx.post(server.url + "/v1/chat/completions", content="{not json", timeout=10)
    assert r.status_code == 401  # the key is checked before the body is even read
    assert r.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("body, param", [
    ("{not json", None),
    ("[1, 2]", None),
    ('{"model": "m"}', "messages"),
    ('{"model": "m", "messages": []}', "messages"),
    ('{"model": "m", "messages": "hello"}', "messages"),
    ('{"model": "m", "messages": [{"role": "robot", "content": "hi"}]}', "messages[0].role"),
    ('{"model": "m", "messages": [{"role": "user"}]}', "messages[0].content"),
    ('{"model": "m", "messages": [{"role": "user", "content": 7}]}', "messages[0].content"),
    ('{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', "temperature"),
    ('{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}', "max_tokens"),
    ('{"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', "stream"),
])
def test_malformed_bodies_get_json_400(server, body, param):
    r = httpx.post(server.url + "/v1/chat/completions", content=body, timeout=10,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


def test_unknown_route_is_json_404(server):
    r = httpx.get(server.url + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert r.status_code == 404 and "does not exist" in r.json()["error"]["message"]


def test_concurrent_clients_get_their_own_answers(client):
    prompts = [f"Question number {i}: tell me about {w}." for i, w in
               enumerate(["the ocean", "rain", "a mountain", "dogs", "foxes", "gardens", "numbers", "sun"])]
    sequential = [ask(client, p).choices[0].message.content for p in prompts]
    assert len(set(sequential)) > 4  # different prompts, different answers: a mix-up would show
    start = threading.Barrier(len(prompts), timeout=30)

    def one(p):
        start.wait()
        return ask(client, p).choices[0].message.content

    with ThreadPoolExecutor(len(prompts)) as pool:
        concurrent = list(pool.map(one, prompts, timeout=60))
    assert concurrent == sequential


class SlowModel:
    """A fake ChatModel: each answer waits for `release`, then yields up to `pieces` words slowly."""

    def __init__(self, pieces=3, delay=0.0):
        self.started, self.release, self.closed = threading.Event(), threading.Event(), threading.Event()
        self.pieces, self.delay = pieces, delay

    def stream(self, messages, **settings):
        def gen():
            try:
                self.started.set()
                assert self.release.wait(30), "test never released the model"
                for i in range(self.pieces):
                    time.sleep(self.delay)
                    yield f"w{i} "
                return Completion("".join(f"w{i} " for i in range(self.pieces)), 1, self.pieces, "length")
            finally:
                self.closed.set()
        return gen()


def post(url, **body):
    return httpx.post(url + "/v1/chat/completions", timeout=30,
                      json={"model": "slow", "messages": [{"role": "user", "content": "hi"}], **body})


def test_full_queue_answers_503(live_server):
    model = SlowModel()
    with live_server(create_app(model, "slow", max_queue=1)) as srv, ThreadPoolExecutor(2) as pool:
        running = pool.submit(post, srv.url)  # taken by the worker, blocks on `release`
        assert model.started.wait(10)
        waiting = pool.submit(post, srv.url)  # fills the queue of 1
        deadline = time.monotonic() + 10
        while httpx.get(srv.url + "/health", timeout=10).json()["queued"] < 1:
            assert time.monotonic() < deadline, "second request never reached the queue"
            time.sleep(0.02)
        r = post(srv.url)
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "queue_full" and "retry" in r.json()["error"]["message"]
        with openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=30) as c:
            with pytest.raises(openai.InternalServerError):
                c.chat.completions.create(model="slow", messages=[{"role": "user", "content": "hi"}])
        model.release.set()
        for fut in (running, waiting):
            r = fut.result(timeout=30)
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "w0 w1 w2 "


def test_disconnected_stream_frees_the_worker(live_server):
    model = SlowModel(pieces=10_000, delay=0.01)
    model.release.set()
    with live_server(create_app(model, "slow")) as srv:
        with httpx.stream("POST", srv.url + "/v1/chat/completions", timeout=30,
                          json={"messages": [{"role": "user", "content": "hi"}], "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # got going, then hang up
        assert model.closed.wait(10), "generation kept running after the client left"


def test_server_command_end_to_end(lively_model_path):
    """`python -m chatrl.serve.server --path X --port 0 --api-key K`, then Ctrl-C: a clean exit."""
    import re
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "chatrl.serve.server", "--path", lively_model_path, "--port", "0",
         "--api-key", KEY, "--model-name", MODEL, "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # the banner; the process exits (EOF) if it cannot start
        match = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        assert match, f"no banner: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}"
        with openai.OpenAI(base_url=match.group(0), api_key=KEY, max_retries=0, timeout=30) as c:
            assert ask(c, "hello").choices[0].message.content
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Server stopped." in out and "Traceback" not in err


def test_port_in_use_is_a_clear_error():
    import socket

    from chatrl.errors import ChatRLError
    from chatrl.serve.server import serve

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(ChatRLError, match=f"cannot listen on 127.0.0.1:{port}.*pick another --port"):
            serve("never-loaded", port=port)


class FailingModel:
    """A fake ChatModel that breaks after one piece (a model bug, an out-of-memory...)."""

    def stream(self, messages, **settings):
        def gen():
            yield "partial "
            if messages[-1]["content"] == "boom":
                raise RuntimeError("simulated failure")
            return Completion("partial", 1, 1, "stop")
        return gen()


def test_model_failure_is_reported_and_worker_survives(live_server):
    with live_server(create_app(FailingModel(), "failing")) as srv:
        r = post(srv.url, messages=[{"role": "user", "content": "boom"}])
        assert r.status_code == 500 and "simulated failure" in r.json()["error"]["message"]
        with openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=30) as c:
            with pytest.raises(openai.APIError, match="simulated failure"):
                list(c.chat.completions.create(model="failing", stream=True,
                                               messages=[{"role": "user", "content": "boom"}]))
        r = post(srv.url)  # the worker is still there
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "partial "
