"""Which model chat/serve use without --path, several models served side by side, and a
terminal chat free of library warnings."""

import os
import shutil
import subprocess
import sys
import time

import httpx
import pytest

from chatrl.errors import ChatRLError
from chatrl.serve.choose import default_model_path, load_models, unique_names
from chatrl.serve.generation import Completion
from chatrl.serve.server import create_app


def fake_model_folder(path, age=0):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    t = time.time() - age
    os.utime(path / "config.json", (t, t))
    return path


def test_default_model_is_the_newest_trained_chat_model(tmp_path):
    out = tmp_path / "output"
    path, why = default_model_path(out)
    assert path == "default" and "embedded default" in why
    fake_model_folder(out / "reward-models" / "m" / "model")  # not a chat model
    assert default_model_path(out)[0] == "default"
    old = fake_model_folder(out / "actor-models" / "old" / "model", age=100)
    new = fake_model_folder(out / "actor-models" / "new" / "model", age=10)
    path, why = default_model_path(out)
    assert path == str(new) and "step-1 (SFT)" in why and str(new) in why
    assert old != new
    actor = fake_model_folder(out / "step3-models" / "m" / "actor", age=1000)  # older, but step 3
    path, why = default_model_path(out)
    assert path == str(actor) and "step-3 (PPO) actor" in why


def test_names_and_model_name_with_several_paths():
    assert unique_names(["output/step3-models/smol/actor", "tiny", "x/tiny", "out/actor-models/smol/model"]) == [
        "smol/actor", "tiny", "tiny-2", "smol/model"]
    with pytest.raises(ChatRLError, match="--model-name 'x' names one model, but 2 are served"):
        load_models(["a", "b"], "x")


class Named:
    """A fake ChatModel that answers with its own name."""

    template = "chat"

    def __init__(self, name):
        self.name = name

    def stream(self, messages, **settings):
        def gen():
            yield self.name
            return Completion(self.name, 1, 1, "stop")
        return gen()


def test_several_models_are_picked_by_name(live_server):
    app = create_app({"a": Named("a"), "b": Named("b")}, "a")
    with live_server(app) as srv:
        def ask(**extra):
            return httpx.post(srv.url + "/v1/chat/completions", timeout=30,
                              json={"messages": [{"role": "user", "content": "hi"}], **extra})

        assert [m["id"] for m in httpx.get(srv.url + "/v1/models", timeout=30).json()["data"]] == ["a", "b"]
        r = ask(model="b")
        assert r.json()["model"] == "b" and r.json()["choices"][0]["message"]["content"] == "b"
        assert ask().json()["model"] == "a"  # no 'model': the default
        r = ask(model="c")
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert "'a', 'b'" in r.json()["error"]["message"]
        assert httpx.get(srv.url + "/v1/models/b", timeout=30).json()["id"] == "b"
    with pytest.raises(ChatRLError, match="default model 'z' is not among"):
        create_app({"a": Named("a")}, "z")


def test_chat_without_path_uses_the_trained_model_and_stays_clean(lively_model_path, tmp_path):
    """`chatrl chat` in a folder where `chatrl train` ran: it says which model it loads, and
    nothing but the conversation reaches stdout (no library warning in the first answer)."""
    shutil.copytree(lively_model_path, tmp_path / "output" / "actor-models" / "lively" / "model")
    proc = subprocess.run([sys.executable, "-W", "default", "-m", "chatrl", "chat", "--max-new-tokens", "8",
                           "--temperature", "0"],
                          input="hello\nand again\n", capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 0, proc.stderr
    assert "No --path given: using the step-1 (SFT) model" in proc.stderr
    assert "Loading model 'output/actor-models/lively/model'" in proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("Chatting with lively/model (chat format)")
    assert [line.split(":")[0] for line in lines[1:]] == ["You", "Assistant", "You", "Assistant", "Goodbye."]
    assert "Warning" not in proc.stdout and "Warning" not in proc.stderr  # the cache API Transformers wants
