"""The web page of `chatrl serve`: chat, compare two models, label which answer is better.

The page (chatrl/serve/static/, plain HTML + JS, no build step, nothing fetched from the
internet) is served at `/` by the same process, on the same port, and talks to the server's own
OpenAI-compatible `/v1` endpoints with the same API key, which the user types into the page.
What the OpenAI API has no word for lives under `/ui`:

  GET  /ui/config            what the page needs before the key is known (no key needed)
  GET  /ui/prompts           the --prompts labelling session, and which prompts are done
  POST /ui/votes             record a vote (see labels.py for the files and their format)
  GET  /ui/votes             counts of collected pairs and ties
  GET  /ui/votes/download    the preference file (?kind=ties: the ties file)

Every /ui route but /ui/config needs the API key when the server has one.
"""

from __future__ import annotations

import argparse
import secrets
from importlib import resources
from typing import Literal

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from ..errors import ChatRLError
from .labels import VERDICTS, LabelStore, read_prompts
from .server import APIError

STATIC = resources.files("chatrl.serve") / "static"


class Answer(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    model: str = Field(min_length=1)
    text: str


class Vote(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    prompt: str = Field(min_length=1)
    system: str | None = None
    left: Answer
    right: Answer
    verdict: Literal[VERDICTS]  # type: ignore[valid-type]
    blind: bool = False
    prompt_id: int | None = None


def add_web_args(parser: argparse.ArgumentParser) -> None:
    """`chatrl serve`'s flags for the web page and labelling."""
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), default=None,
                        help="serve models A and B (besides any --path) and open the page's "
                             "Compare tab on them")
    parser.add_argument("--labels", default="preferences.jsonl",
                        help="where the Compare tab's votes go: preference pairs for `chatrl rm/dpo "
                             "--data-path`; ties and 'both bad' go to <name>.ties.jsonl beside it "
                             "(default preferences.jsonl)")
    parser.add_argument("--prompts", default=None,
                        help="a labelling session: prompts (.txt one a line, or .jsonl with "
                             "'prompt') that the Compare tab walks through")
    parser.add_argument("--no-web-ui", dest="web_ui", action="store_false",
                        help="serve only the API: no page at /")


def web_options(args: argparse.Namespace) -> dict | None:
    """The `add_web_ui` keyword arguments from parsed flags (None with --no-web-ui)."""
    if not args.web_ui:
        return None
    return {"labels": args.labels, "prompts": read_prompts(args.prompts) if args.prompts else None,
            "compare": args.compare}


def add_web_ui(app: FastAPI, *, api_key: str | None, labels: str | LabelStore = "preferences.jsonl",
               prompts: list[str] | None = None, compare: list[str] | None = None) -> FastAPI:
    """Add the page and its /ui routes to a `create_app` app.

    labels: the preference file (or a LabelStore); prompts: a labelling session's prompts;
    compare: the two model names the Compare tab starts with.
    """
    store = labels if isinstance(labels, LabelStore) else LabelStore(labels)
    expected = f"Bearer {api_key}".encode() if api_key else None
    app.state.labels = store

    def check_key(request: Request) -> None:
        if expected is None:
            return
        got = request.headers.get("authorization", "").encode()
        if not secrets.compare_digest(got, expected):
            why = "no API key was sent" if not got else "the API key is not valid"
            raise APIError(401, f"{why}; type the server's key (chatrl serve --api-key) into the "
                                "page's API key box", code="invalid_api_key")

    keyed = [Depends(check_key)]

    @app.get("/", include_in_schema=False)
    async def index():
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"),
                            headers={"Cache-Control": "no-cache"})

    app.mount("/ui/static", StaticFiles(directory=str(STATIC)), name="ui-static")

    @app.get("/ui/config")
    async def config():
        return {"auth": expected is not None, "compare": compare, "labels_file": store.path.name,
                "ties_file": store.ties.name, "prompts": len(prompts or [])}

    @app.get("/ui/prompts", dependencies=keyed)
    def get_prompts():  # sync: reads files, so FastAPI runs it in a thread
        done = store.labelled_prompts()
        items = prompts or []
        return {"prompts": [{"id": i, "prompt": p, "done": p in done} for i, p in enumerate(items)]}

    @app.get("/ui/votes", dependencies=keyed)
    async def vote_counts():
        return store.counts()

    @app.post("/ui/votes", dependencies=keyed)
    def vote(v: Vote):  # sync: the write (fsync) must not hold the event loop
        extra = {"blind": v.blind}
        if v.prompt_id is not None:
            extra["prompt_id"] = v.prompt_id
        try:
            return store.add(v.prompt, v.system, v.left.model_dump(), v.right.model_dump(), v.verdict,
                             **extra)
        except ChatRLError as e:
            raise APIError(400, str(e), param="verdict") from e

    @app.get("/ui/votes/download", dependencies=keyed)
    async def download(kind: Literal["pairs", "ties"] = "pairs"):
        path = store.path if kind == "pairs" else store.ties
        if not path.exists():
            return Response(b"", media_type="application/jsonl",
                            headers={"Content-Disposition": f'attachment; filename="{path.name}"'})
        return FileResponse(path, media_type="application/jsonl", filename=path.name)

    return app
