"""Remote reward: POST completions as JSON to a URL, registered as the factory `remote_rm`.

Request (`Content-Type: application/json`), `batch_size` completions per request:

    {"inputs": [{"id": ..., "source": ..., "group": 0,
                 "completion": "...", "completion_ids": [...],
                 "messages": [{"role": "user", "content": [{"type": "image", "image": "<path or data: URL>"},
                                                           {"type": "text", "text": "..."}]}],
                 "answer": ..., "choices": [...], "meta": {...}}, ...]}

`messages` are the prompt the policy saw; with `media: base64` each local media file is sent
inline as a `data:<mime>;base64,...` URL, with `media: path` as its absolute path (the server
must see the same files).

Answer: HTTP 2xx with `{"scores": [...]}`, one entry per input, in order: a number, null (not
applicable), or `{"score": number, "<sub>": number, ...}` with sub-scores. A connection failure,
a timeout, an HTTP 5xx / 408 / 429 or an answer in another shape is retried (`retries` times,
waiting `backoff` seconds, doubling); then those completions get None, counted as errors, and the
URL and status are logged. Other HTTP 4xx are not retried.

Safety: a redirect (HTTP 3xx) is an error, not followed: following it would send the request
and its `headers` (an `Authorization` token) to another address. `timeout` bounds the whole
attempt (connect, send, the complete answer), not each socket read, so a server that trickles
its answer cannot hold a step. An answer over `max_bytes` is refused. Requests run in daemon
threads: a request still in flight (its reward abandoned by `rewards[i].timeout`) never keeps
the process from exiting. Proxies from the environment (`http_proxy`) are not used.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import mimetypes
import re
import socket
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

from lightrft_mm.errors import RewardError
from lightrft_mm.rewards.core import RewardInput, RewardOptions, reward_options
from lightrft_mm.schema import MEDIA_TYPES

log = logging.getLogger("lightrft_mm.rewards.remote")
MEDIA_MODES = ("path", "base64")
_RETRY_STATUS = (408, 429)
MAX_BYTES = 64 * 2**20  # default largest answer: 64 MiB
_URL = re.compile(r"^(?:[a-zA-Z][a-zA-Z0-9+.-]*://|data:)")  # left as they are


@reward_options(factory=True)
def remote_rm(url: str, media: str = "path", timeout: float = 30.0, retries: int = 2, backoff: float = 0.5,
              concurrency: int = 4, batch_size: int = 16, headers: dict | None = None,
              max_bytes: int = MAX_BYTES) -> "RemoteReward":
    """Builds a remote reward (see the module docstring); config: `name: remote_rm, args: {url: ...}`.

    Args:
        url: the http(s) endpoint that scores completions.
        media: how media files travel: path (absolute paths) or base64 (inline data: URLs).
        timeout: seconds one attempt may take in total (connect, send, read the whole answer).
        retries: extra attempts of a failed request.
        backoff: seconds before the first retry (doubling after each).
        concurrency: most requests in flight at once.
        batch_size: completions per request.
        headers: extra HTTP headers (e.g. {Authorization: "Bearer ..."}); sent to `url` only.
        max_bytes: largest answer accepted (default 64 MiB); a larger one is an error.
    """
    problems = []
    if not (isinstance(url, str) and url.startswith(("http://", "https://")) and urllib.parse.urlsplit(url).hostname):
        problems.append(f"url {url!r} is not an http(s) URL")
    if media not in MEDIA_MODES:
        problems.append(f"media {media!r} is not one of {', '.join(MEDIA_MODES)}")
    for key, value, low in (("timeout", timeout, 0), ("backoff", backoff, 0)):
        if not isinstance(value, (int, float)) or value < low or (key == "timeout" and value == 0):
            problems.append(f"{key} {value!r} must be a number {'> 0' if key == 'timeout' else '>= 0'}")
    for key, value, low in (("retries", retries, 0), ("concurrency", concurrency, 1), ("batch_size", batch_size, 1),
                            ("max_bytes", max_bytes, 1)):
        if not isinstance(value, int) or value < low:
            problems.append(f"{key} {value!r} must be a whole number >= {low}")
    if headers is not None and not isinstance(headers, dict):
        problems.append(f"headers {headers!r} must be a mapping")
    if problems:
        raise RewardError("remote_rm: " + "; ".join(problems) + ".")
    return RemoteReward(url, media=media, timeout=float(timeout), retries=retries, backoff=float(backoff),
                        concurrency=concurrency, batch_size=batch_size, headers=dict(headers or {}),
                        max_bytes=max_bytes)


class RemoteReward:
    """A batched reward that asks an HTTP server (see the module docstring)."""

    __lightrft_reward__ = RewardOptions(batched=True)

    def __init__(self, url: str, *, media: str = "path", timeout: float = 30.0, retries: int = 2,
                 backoff: float = 0.5, concurrency: int = 4, batch_size: int = 16, headers: dict | None = None,
                 max_bytes: int = MAX_BYTES):
        self.url = url
        self.media = media
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.concurrency = concurrency
        self.batch_size = batch_size
        self.headers = headers or {}
        self.max_bytes = max_bytes

    def __call__(self, inputs: list[RewardInput]) -> list:
        chunks = [inputs[i:i + self.batch_size] for i in range(0, len(inputs), self.batch_size)]
        answers: list = [None] * len(chunks)
        todo = iter(range(len(chunks)))
        lock = threading.Lock()

        def worker() -> None:
            while True:
                with lock:
                    j = next(todo, None)
                if j is None:
                    return
                answers[j] = self._score_chunk(chunks[j])

        # Daemon threads, not a ThreadPoolExecutor: its threads are joined at exit, so a request
        # left running by an abandoned call would keep a finished run from exiting.
        threads = [threading.Thread(target=worker, daemon=True, name="remote-reward")
                   for _ in range(min(self.concurrency, len(chunks)))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return [value for answer in answers for value in answer]

    def _score_chunk(self, chunk: list[RewardInput]) -> list:
        try:
            return self.post({"inputs": [self.row(x) for x in chunk]}, len(chunk))
        except Exception as exc:  # noqa: BLE001 - these completions fail; the others go on
            log.warning("%s", exc)
            return [exc] * len(chunk)

    def row(self, x: RewardInput) -> dict:
        """The JSON object of one completion."""
        s = x.sample
        return {"id": s.id, "source": s.source, "group": x.group, "completion": x.completion,
                "completion_ids": list(x.completion_ids),
                "messages": [{"role": m.role, "content": [self._part(p) for p in m.content]} for m in x.messages],
                "answer": s.answer, "choices": s.choices, "meta": s.meta}

    def _part(self, part) -> dict:
        d = part.to_dict()
        path = part.path
        if part.type in MEDIA_TYPES and path and self.media == "base64" and not _URL.match(path):
            mime = mimetypes.guess_type(path)[0] or "application/octet-stream"
            try:
                data = Path(path).read_bytes()
            except OSError as exc:
                raise RewardError(f"remote reward {self.url}: cannot read media file {path}: {exc}") from exc
            d[part.type] = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
        return d

    def post(self, payload: dict, n: int) -> list:
        """POSTs one request; retries; returns its n scores or raises RewardError (URL, status)."""
        body = json.dumps(payload, default=str).encode("utf-8")
        headers = {"Content-Type": "application/json", **self.headers}
        problem = ""
        for attempt in range(1, self.retries + 2):
            retry = True
            try:
                status, reason, answer, location = self._attempt(body, headers)
                if 300 <= status < 400:
                    problem = (f"HTTP {status} {reason}: a redirect to {location!r}, which remote_rm does not follow "
                               "(it would send the request and its headers, e.g. Authorization, to another "
                               "address). Fix: set url to the address that answers the POST")
                    retry = False
                elif not 200 <= status < 300:
                    problem = f"HTTP {status} {reason}: {answer[:200].decode('utf-8', 'replace')!r}"
                    retry = status >= 500 or status in _RETRY_STATUS
                else:
                    try:
                        return _scores(answer, n)
                    except ValueError as exc:
                        problem = f"HTTP {status}, but the answer is unusable: {exc}"
            except _TooLarge as exc:
                problem, retry = str(exc), False
            except (OSError, http.client.HTTPException) as exc:  # refused, DNS, timeout, broken answer
                problem = f"no answer ({exc or type(exc).__name__})"
            log.debug("remote reward %s: %s (attempt %d of %d)", self.url, problem, attempt, self.retries + 1)
            if not retry:
                break
            if attempt <= self.retries:
                time.sleep(self.backoff * 2 ** (attempt - 1))
        raise RewardError(f"remote reward {self.url}: {problem}; gave up after {attempt} attempt(s), "
                          f"{n} completion(s) get None")

    def _attempt(self, body: bytes, headers: dict) -> tuple[int, str, bytes, str | None]:
        """One POST within `timeout` seconds in all: (status, reason, answer, Location header).

        Raises:
            TimeoutError: the whole answer did not come within `timeout`.
            _TooLarge: the answer is over `max_bytes`.
            OSError, http.client.HTTPException: no connection, or a broken answer.
        """
        parts = urllib.parse.urlsplit(self.url)
        deadline = time.monotonic() + self.timeout
        kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = kind(parts.hostname, parts.port, timeout=self.timeout)
        expired = threading.Event()

        def expire() -> None:  # wakes a read that is blocked, or fed one byte at a time
            expired.set()  # first: a socket made after this check is caught by the check after request()
            sock = conn.sock
            if sock is not None:
                try:
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the OS socket, under TLS too
                except OSError:
                    pass

        watchdog = threading.Timer(self.timeout, expire)
        watchdog.daemon = True
        watchdog.start()
        try:
            conn.request("POST", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), body, headers)
            if expired.is_set():
                raise TimeoutError
            response = conn.getresponse()
            declared = response.getheader("Content-Length")
            if declared and declared.isdigit() and int(declared) > self.max_bytes:
                raise _TooLarge(self._too_large(f"it declares Content-Length {declared}"))
            answer = bytearray()
            while len(answer) <= self.max_bytes and not expired.is_set():
                if time.monotonic() >= deadline:
                    expired.set()
                    break
                data = response.read1(65536)
                if not data:
                    break
                answer += data
            if len(answer) > self.max_bytes:
                raise _TooLarge(self._too_large("more came"))
            if expired.is_set():
                raise TimeoutError
            return response.status, response.reason, bytes(answer), response.getheader("Location")
        except (OSError, http.client.HTTPException):
            if expired.is_set():
                raise TimeoutError(f"the whole answer did not come within timeout={self.timeout:g}s") from None
            raise
        finally:
            watchdog.cancel()
            conn.close()

    def _too_large(self, why: str) -> str:
        return (f"the answer is larger than max_bytes={self.max_bytes} ({why}). Fix: score fewer completions per "
                "request (batch_size), or raise max_bytes")


class _TooLarge(Exception):
    pass


def _scores(answer: bytes, n: int) -> list[Any]:
    """The `scores` list of an answer, or ValueError saying what is wrong with it."""
    try:
        data = json.loads(answer)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"not JSON: {answer[:80]!r}") from None
    scores = data.get("scores") if isinstance(data, dict) else None
    if not isinstance(scores, list):
        raise ValueError(f'expected {{"scores": [...]}}, got {json.dumps(data)[:80]}')
    if len(scores) != n:
        raise ValueError(f"{len(scores)} scores for {n} inputs")
    return scores
