"""A reward server over HTTP: chatrl POSTs one rollout batch as JSON and reads one reward per
answer back.

    request  {"prompts": [...], "completions": [...], "columns": {name: [...]}}
    response {"rewards": [float, ...]}          (a bare JSON list is accepted too)

Each request has a timeout; connection failures, timeouts and 5xx answers are retried (with a
short back-off); anything else, or running out of tries, is a one-line RewardError saying what
the server did. `serve_reward_function` runs such a server for a Python reward function (used by
the tests; handy to put a slow verifier on another machine).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

from . import RewardError

__all__ = ["RemoteReward", "serve_reward_function"]


class RemoteReward:
    is_correctness = False
    per_sample_retry = False  # one request per batch; a failing server is not a failing sample

    def __init__(self, url: str, name: str = "remote", timeout: float = 30.0, retries: int = 2,
                 backoff: float = 0.5):
        if not url.startswith(("http://", "https://")):
            raise RewardError(f"--reward-url {url!r} is not an http:// or https:// URL")
        self.url, self.name, self.timeout = url, name, timeout
        self.retries, self.backoff = retries, backoff

    def __call__(self, batch) -> list[float]:
        body = json.dumps({"prompts": batch.prompts, "completions": batch.completions,
                           "columns": batch.columns}, default=str).encode()
        last, hint = None, "check that it is running and reachable, or raise --reward-timeout"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            req = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    data = json.loads(resp.read().decode() or "null")
            except urllib.error.HTTPError as e:
                detail = e.read().decode(errors="replace")[:200]
                last = f"HTTP {e.code} {e.reason}: {' '.join(detail.split())}"
                hint = "the server reported an error: fix its reward function"
                if e.code < 500:
                    break
                continue
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                reason = getattr(e, "reason", e)
                last = f"{type(reason).__name__}: {reason}"
                continue
            except json.JSONDecodeError as e:
                last = f"an answer that is not JSON ({e})"
                hint = 'it must answer {"rewards": [one number per completion]}'
                break
            rewards = data.get("rewards") if isinstance(data, dict) else data
            if not isinstance(rewards, list):
                raise RewardError(f"reward server {self.url} answered {str(data)[:100]!r}; it must "
                                  'answer {"rewards": [one number per completion]}')
            return rewards
        raise RewardError(f"reward server {self.url} failed after {attempt + 1} tries ({last}); {hint}")


def serve_reward_function(fn, host: str = "127.0.0.1", port: int = 0):
    """Start a threaded HTTP reward server for `fn(prompts, completions, **columns)`; returns the
    server (``server.server_address`` has the port; ``server.shutdown()`` stops it)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            n = int(self.headers.get("Content-Length", 0))
            req = json.loads(self.rfile.read(n) or b"{}")
            try:
                rewards = fn(req["prompts"], req["completions"], **req.get("columns", {}))
                payload, code = json.dumps({"rewards": list(rewards)}).encode(), 200
            except Exception as e:  # noqa: BLE001 - report the function's error to the client
                payload, code = json.dumps({"error": f"{type(e).__name__}: {e}"}).encode(), 500
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):  # quiet
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
