"""Fixtures for chat/serve tests: a tiny model whose greedy answers vary, and a live server."""

import socket
import threading
import time

import pytest
import torch


@pytest.fixture(scope="session")
def lively_model_path(tiny_model_path, tmp_path_factory):
    """The tiny Llama with larger random weights, saved as a chatrl model folder.

    The stock tiny model's near-zero init makes greedy decoding repeat the prompt's last token
    ("\\n") for every prompt, so every answer is empty; these weights give each prompt its own
    (gibberish, deterministic) answer, which is what the tests compare.
    """
    return lively_copy(tiny_model_path, tmp_path_factory.mktemp("lively-tiny"), seed=0)


@pytest.fixture(scope="session")
def lively_factory():
    """lively_copy(src, out, seed) for tests that need more than one lively model."""
    return lively_copy


def lively_copy(src: str, out, seed: int) -> str:
    """A copy of the tiny model at `src` with random weights of a useful scale (seeded) in `out`."""
    from chatrl.models import load_causal_lm, load_tokenizer, write_meta

    tok = load_tokenizer(src)
    model = load_causal_lm(src, tokenizer=tok)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 if "embed" in name else 0.2))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    write_meta(out, template="chat", step="test")
    return str(out)


@pytest.fixture(scope="session")
def chat_model(lively_model_path):
    from chatrl.serve.generation import ChatModel

    return ChatModel.load(lively_model_path, device="cpu")


class LiveServer:
    """A real uvicorn server on a free loopback port, in a background thread."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()
        assert not self.thread.is_alive(), "server did not shut down"


@pytest.fixture(scope="session")
def live_server():
    return LiveServer
