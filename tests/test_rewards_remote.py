"""The remote reward against a local HTTP server started by the test: payload, media as paths
or base64, retries, garbage answers, a server that is down, timeouts and the concurrency limit."""

from __future__ import annotations

import base64
import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lightrft_mm.config import load_config
from lightrft_mm.errors import RewardError
from lightrft_mm.rewards import REWARDS, RewardInput, RewardSet, build_reward_set, score, score_rewards
from lightrft_mm.rewards.core import Reward
from lightrft_mm.schema import Sample


FIXED_ANSWERS = {"500": (500, b"overloaded"), "400": (400, b"bad request"), "garbage": (200, b"<html>not json</html>")}


class Server:
    """A scoring server whose behaviour a test sets: `script` lists the answers to give in turn
    ("ok", "garbage", "500", "400", "short", "slow"); after it runs out every answer is "ok"."""

    def __init__(self):
        self.script: list[str] = []
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.active = 0
        self.peak = 0
        self.delay = 0.0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(body)
                    server.headers.append(dict(self.headers))
                    server.active += 1
                    server.peak = max(server.peak, server.active)
                    mode = server.script.pop(0) if server.script else "ok"
                try:
                    time.sleep(server.delay if mode != "slow" else 2.0)
                    status, payload = self._answer(mode, body["inputs"])
                finally:
                    # Out of flight before the answer is written: the client may send its next
                    # request as soon as it has read this one, before this thread runs again.
                    with server.lock:
                        server.active -= 1
                self._send(status, payload)

            def _answer(self, mode, inputs):
                if mode in FIXED_ANSWERS:
                    return FIXED_ANSWERS[mode]
                scores = [{"score": len(x["completion"]), "words": len(x["completion"].split())}
                          if x["source"] != "skip" else None for x in inputs]
                if mode == "short":
                    scores = scores[:-1]
                return 200, json.dumps({"scores": scores}).encode()

            def _send(self, status, payload):
                self.send_response(status)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/score"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "pic.png"
    path.write_bytes(b"\x89PNG fake image bytes")
    return path


def _inputs(image, n=4, source="chart"):
    sample = Sample.from_dict({"id": "q1", "source": source, "answer": "7", "choices": ["7", "8"], "meta": {"k": 1},
                               "messages": [{"role": "user", "content": [{"type": "image", "image": str(image)},
                                                                         {"type": "text", "text": "How many?"}]}]})
    return [RewardInput("w" * (i + 1) + " end", (5, 6), sample, 0) for i in range(n)]


def _remote(**args):
    return REWARDS.get("remote_rm")(**{"backoff": 0.01, **args})


def test_scores_payload_and_sub_scores(server, image):
    fn = _remote(url=server.url, batch_size=3)
    scored = score_rewards(RewardSet([Reward("remote", fn)]), _inputs(image), 4)
    assert scored.rewards.view(-1).tolist() == [5.0, 6.0, 7.0, 8.0]
    assert scored.metrics["reward/remote.words"] == 2.0
    assert sorted(len(r["inputs"]) for r in server.requests) == [1, 3]  # batch_size per request (concurrent)
    row = next(r for r in server.requests if len(r["inputs"]) == 3)["inputs"][0]
    assert {k: row[k] for k in ("id", "source", "group", "completion", "completion_ids", "answer", "choices", "meta")} \
        == {"id": "q1", "source": "chart", "group": 0, "completion": "w end", "completion_ids": [5, 6], "answer": "7",
            "choices": ["7", "8"], "meta": {"k": 1}}
    assert row["messages"][0]["content"][0] == {"type": "image", "image": str(image)}  # media: path


def test_media_as_base64(server, image):
    score(RewardSet([Reward("remote", _remote(url=server.url, media="base64"))]), _inputs(image, 1))
    part = server.requests[0]["inputs"][0]["messages"][0]["content"][0]
    prefix = "data:image/png;base64,"
    assert part["image"].startswith(prefix)
    assert base64.b64decode(part["image"][len(prefix):]) == image.read_bytes()


def test_none_answers_and_config_args(server, image):
    args = f"{{url: '{server.url}', batch_size: 1, retries: 0}}"
    cfg = load_config(None, [f"rewards=[{{name: remote_rm, args: {args}}}]"])
    rs = build_reward_set(cfg.rewards)
    assert rs.rewards[0].fn.batch_size == 1 and rs.rewards[0].fn.retries == 0
    scored = score_rewards(rs, _inputs(image, 2, source="skip"), 2)
    assert scored.valid.tolist() == [[False, False]] and scored.metrics["reward/remote_rm/errors"] == 0
    assert len(server.requests) == 2


def test_retries_then_succeeds(server, image, caplog):
    server.script = ["500", "garbage", "short"]
    out = score(RewardSet([Reward("remote", _remote(url=server.url, retries=3))]), _inputs(image, 2))
    assert out.outcomes["remote"].values == [5.0, 6.0]
    assert len(server.requests) == 4


def test_garbage_after_retries_is_none_counted_and_logged(server, image, caplog):
    server.script = ["garbage"] * 3
    with caplog.at_level(logging.WARNING):
        scored = score_rewards(RewardSet([Reward("remote", _remote(url=server.url, retries=2))]), _inputs(image, 2), 2)
    assert len(server.requests) == 3
    assert scored.metrics["reward/remote/errors"] == 2 and scored.valid.tolist() == [[False, False]]
    assert server.url in caplog.text and "HTTP 200" in caplog.text and "not JSON" in caplog.text


def test_client_errors_are_not_retried(server, image, caplog):
    server.script = ["400"]
    with caplog.at_level(logging.WARNING):
        out = score(RewardSet([Reward("remote", _remote(url=server.url, retries=3))]), _inputs(image, 1))
    assert out.outcomes["remote"].status == ["error"] and len(server.requests) == 1
    assert "HTTP 400" in caplog.text and server.url in caplog.text


def test_server_down(image, caplog):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/score"
    with caplog.at_level(logging.WARNING):
        scored = score_rewards(RewardSet([Reward("remote", _remote(url=url, retries=1))]), _inputs(image, 2), 2)
    assert scored.metrics["reward/remote/errors"] == 2
    assert url in caplog.text and "no answer" in caplog.text and "2 attempt(s)" in caplog.text
    with pytest.raises(RewardError, match=f"{url}.*no answer"):
        score(RewardSet([Reward("remote", _remote(url=url, retries=0))], fail_fast=True), _inputs(image, 1))


def test_request_timeout(server, image):
    server.script = ["slow"]
    started = time.perf_counter()
    out = score(RewardSet([Reward("remote", _remote(url=server.url, timeout=0.3, retries=0))]), _inputs(image, 1))
    assert out.outcomes["remote"].status == ["error"] and time.perf_counter() - started < 1.5


def test_concurrency_limit(server, image):
    server.delay = 0.15
    score(RewardSet([Reward("remote", _remote(url=server.url, batch_size=1, concurrency=2))]), _inputs(image, 6))
    assert server.peak == 2
    server.peak = 0
    score(RewardSet([Reward("remote", _remote(url=server.url, batch_size=1, concurrency=6))]), _inputs(image, 6))
    assert server.peak > 2


@pytest.mark.parametrize("args, words", [
    ({"url": "localhost:8000"}, "not an http(s) URL"), ({"url": "http://x", "media": "inline"}, "media"),
    ({"url": "http://x", "timeout": 0}, "timeout"), ({"url": "http://x", "concurrency": 0}, "concurrency"),
])
def test_bad_args(args, words):
    with pytest.raises(RewardError, match="remote_rm") as info:
        REWARDS.get("remote_rm")(**args)
    assert words in str(info.value)


def test_headers_and_backoff(server, image):
    score(RewardSet([Reward("remote", _remote(url=server.url, headers={"Authorization": "Bearer t0k"}))]),
          _inputs(image, 1))
    assert server.headers[0]["Authorization"] == "Bearer t0k"
    for backoff, low, high in ((1.0, 1.0, 5.0), (0.0, 0.0, 0.8)):
        server.script = ["500"]
        started = time.perf_counter()
        remote = _remote(url=server.url, retries=1, backoff=backoff)
        out = score(RewardSet([Reward("remote", remote)]), _inputs(image, 1))
        assert low <= time.perf_counter() - started < high and out.outcomes["remote"].values == [5.0]


# --- hostile or broken servers: redirects, trickled and oversized answers, exit ---------------------

class _Plain:
    """A server whose every POST / GET is answered by `answer(handler)`; records what it receives."""

    def __init__(self, answer):
        self.seen: list[tuple[str, dict]] = []
        self.stop = threading.Event()
        plain = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _any(self):
                plain.seen.append((self.command, dict(self.headers)))
                answer(self)

            do_GET = do_POST = _any

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/score"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def plain():
    made = []

    def make(answer):
        made.append(_Plain(answer))
        return made[-1]

    yield make
    for server in made:
        server.close()


def _reply(status, body=b"", **headers):
    def answer(handler):
        handler.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **headers}.items():
            handler.send_header(key, value)
        handler.end_headers()
        handler.wfile.write(body)
    return answer


def _trickle(body: bytes, every: float, stop: list):
    """Sends `body` (its full Content-Length up front) one byte per `every` seconds."""
    def answer(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        for byte in body:
            if stop[0].is_set():
                return
            handler.wfile.write(bytes([byte]))
            handler.wfile.flush()
            time.sleep(every)
    return answer


def test_a_redirect_is_an_error_and_the_token_goes_nowhere_else(plain, image, caplog):
    elsewhere = plain(_reply(200, json.dumps({"scores": [1.0]}).encode()))
    for status in (302, 307):
        first = plain(_reply(status, Location=elsewhere.url))
        remote = _remote(url=first.url, retries=2, headers={"Authorization": "Bearer s3cret"})
        with caplog.at_level(logging.WARNING):
            out = score(RewardSet([Reward("remote", remote)]), _inputs(image, 1))
        assert out.outcomes["remote"].status == ["error"]
        assert [command for command, _ in first.seen] == ["POST"]  # not retried either
        assert first.seen[0][1]["Authorization"] == "Bearer s3cret"
        assert f"HTTP {status}" in caplog.text and first.url in caplog.text and elsewhere.url in caplog.text
        assert "does not follow" in caplog.text
    assert elsewhere.seen == []  # the redirect target received no request, so no Authorization header


def test_a_trickled_answer_fails_after_the_total_timeout(plain, image, caplog):
    stop = [None]
    server = plain(_trickle(json.dumps({"scores": [1.0]}).encode().ljust(40), 0.1, stop))  # 4 s in all
    stop[0] = server.stop
    started = time.perf_counter()
    with caplog.at_level(logging.WARNING):
        out = score(RewardSet([Reward("remote", _remote(url=server.url, timeout=1.0, retries=0))]), _inputs(image, 1))
    took = time.perf_counter() - started
    assert out.outcomes["remote"].status == ["error"]
    assert 0.9 < took < 2.0, took  # each byte came well within 1 s; the whole answer did not
    assert "did not come within timeout=1s" in caplog.text and server.url in caplog.text


def test_an_oversized_answer_is_refused(plain, image, caplog):
    big = json.dumps({"scores": [1.0], "pad": "x" * 5000}).encode()
    declared = plain(_reply(200, big))

    def undeclared(handler):  # no Content-Length: read until the server closes
        handler.send_response(200)
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.wfile.write(big)

    streamed = plain(undeclared)
    for server in (declared, streamed):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            out = score(RewardSet([Reward("remote", _remote(url=server.url, max_bytes=1000, retries=2))]),
                        _inputs(image, 1))
        assert out.outcomes["remote"].status == ["error"] and len(server.seen) == 1  # not retried
        assert "larger than max_bytes=1000" in caplog.text and server.url in caplog.text
    ok = score(RewardSet([Reward("remote", _remote(url=declared.url))]), _inputs(image, 1))
    assert ok.outcomes["remote"].values == [1.0]  # the default cap (64 MiB) lets it through


_EXITS = """
import sys, time
from lightrft_mm.rewards import REWARDS, Reward, RewardInput, run_reward
from lightrft_mm.schema import Sample

sample = Sample.from_dict({"id": "q", "source": "s", "messages": [{"role": "user", "content": "hi"}]})
inputs = [RewardInput("a", (1,), sample, 0)]
remote_rm = REWARDS.get("remote_rm")
started = time.monotonic()
# the request's own total timeout, then a reward abandoned by its rewards[i].timeout mid-request
print(run_reward(Reward("own", remote_rm(url=sys.argv[1], timeout=1.0, retries=0)), inputs).status, flush=True)
print(run_reward(Reward("cut", remote_rm(url=sys.argv[1], timeout=60.0, retries=0), timeout=0.5),
                 inputs).status, f"{time.monotonic() - started:.1f}", flush=True)
"""


def test_a_run_exits_while_a_reward_server_still_trickles(plain, tmp_path):
    stop = [None]
    server = plain(_trickle(b" " * 10_000, 0.1, stop))  # would take 1000 s
    stop[0] = server.stop
    script = tmp_path / "exits.py"
    script.write_text(_EXITS)
    import subprocess
    import sys

    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(script), server.url], capture_output=True, text=True, timeout=20)
    took = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr
    own, cut = proc.stdout.splitlines()
    assert own == "['error']" and cut.startswith("['timeout']")
    assert took < float(cut.split()[-1]) + 3.0, (took, cut)  # exited right after the last reward returned
