"""`chatrl inspect RUN_DIR [--html FILE]`: look at what PPO's policy said and what it learned.

Reads the rollout log that `chatrl ppo --log-rollouts-interval N` writes (rollouts.py) and the
run's metrics.jsonl, and builds ONE self-contained HTML page (data, script and style inline: it
opens from a file, offline): pick an iteration, its answers sorted by reward, each token coloured
by its advantage (or KL, log-prob, value, per-token reward) with all its numbers on hover, and
reward / KL / length curves over the iterations. With --html the page is written to FILE; without
it, it is served on http://127.0.0.1:PORT/ until Ctrl-C.
"""

from __future__ import annotations

import argparse
import http.server
import json
import sys
from importlib import resources
from pathlib import Path

from .errors import ChatRLError
from .logging import read_metrics
from .rollouts import read_rollouts

TEMPLATE = "inspector.html"


def build_html(run_dir: str | Path) -> str:
    """The viewer page of a step-3 run folder, data embedded."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ChatRLError(f"{run_dir} is not a folder; give a step-3 output folder, e.g. "
                          "output/step3-models/<model>")
    rollouts = read_rollouts(run_dir)
    if not rollouts:
        raise ChatRLError(f"{run_dir} has no rollout log ({run_dir / 'rollouts'}/iter_*.jsonl); run "
                          "`chatrl ppo ... --log-rollouts-interval 1` (or N) to write one")
    metrics = [{k: v for k, v in r.items() if k in ("step", "kind", "reward/score", "policy/kl",
                                                       "response/length")}
               for r in read_metrics(run_dir)]
    data = json.dumps({"rollouts": rollouts, "metrics": metrics}, ensure_ascii=False)
    # Inside <script>, "</" could close the tag: escape it (JSON reads "<\/" as "</").
    data = data.replace("</", "<\\/")
    page = (resources.files("chatrl") / TEMPLATE).read_text(encoding="utf-8")
    title = str(run_dir.resolve()).replace("&", "&amp;").replace("<", "&lt;")
    return page.replace("__TITLE__", title).replace("__DATA__", data)


def serve_html(page: str, port: int) -> None:
    body = page.encode("utf-8")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    except OSError as e:
        raise ChatRLError(f"cannot listen on 127.0.0.1:{port} ({e.strerror}); pick another --port") from e
    print(f"Inspector at http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def inspect_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="chatrl inspect", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a step-3 output folder (holding rollouts/ and metrics.jsonl)")
    p.add_argument("--html", default=None, help="write the page to this file instead of serving it")
    p.add_argument("--port", type=int, default=8001, help="port to serve on (default 8001; 0: any)")
    args = p.parse_args(argv)
    page = build_html(args.run_dir)
    if args.html:
        out = Path(args.html)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(page, encoding="utf-8")
        print(f"wrote {out} ({len(page.encode()) / 1024:.0f} KiB; open it in a browser, offline)")
        return 0
    serve_html(page, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(inspect_main(sys.argv[1:]))
