"""Talking to a trained model: terminal chat and an OpenAI-compatible HTTP server.

- generation.py: ChatModel (model + tokenizer + conversation format), greedy/sampled, streaming;
- chat.py:       `chatrl chat --path <model>`, multi-turn, /reset, /quit;
- server.py:     `chatrl serve --path <model>`, /v1/chat/completions (+ streaming), /v1/models.

CLI hooks: add_chat_args(parser) / chat_main(args), add_serve_args(parser) / serve_main(args).
Names load lazily: `chatrl chat` never imports FastAPI, and `python -m chatrl.serve.chat`
does not find its module already imported by this package.
"""

_WHERE = {
    "ChatModel": "generation", "Completion": "generation",
    "add_chat_args": "chat", "chat_main": "chat", "run_chat": "chat",
    "add_serve_args": "server", "create_app": "server", "serve": "server", "serve_main": "server",
}

__all__ = list(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        from importlib import import_module

        return getattr(import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
