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

Answer: `{"scores": [...]}`, one entry per input, in order: a number, null (not applicable), or
`{"score": number, "<sub>": number, ...}` with sub-scores. A connection failure, a timeout, an
HTTP 5xx / 408 / 429 or an answer in another shape is retried (`retries` times, waiting `backoff`
seconds, doubling); then those completions get None, counted as errors, and the URL and status
are logged. Other HTTP 4xx are not retried.
"""

from __future__ import annotations

import base64
import json
import logging
import mimetypes
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from lightrft_mm.errors import RewardError
from lightrft_mm.rewards.core import RewardInput, RewardOptions, reward_options
from lightrft_mm.schema import MEDIA_TYPES

log = logging.getLogger("lightrft_mm.rewards.remote")
MEDIA_MODES = ("path", "base64")
_RETRY_STATUS = (408, 429)
_URL = re.compile(r"^(?:[a-zA-Z][a-zA-Z0-9+.-]*://|data:)")  # left as they are


@reward_options(factory=True)
def remote_rm(url: str, media: str = "path", timeout: float = 30.0, retries: int = 2, backoff: float = 0.5,
              concurrency: int = 4, batch_size: int = 16, headers: dict | None = None) -> "RemoteReward":
    """Builds a remote reward (see the module docstring); config: `name: remote_rm, args: {url: ...}`.

    Args:
        url: the http(s) endpoint that scores completions.
        media: how media files travel: path (absolute paths) or base64 (inline data: URLs).
        timeout: seconds to wait for one answer.
        retries: extra attempts of a failed request.
        backoff: seconds before the first retry (doubling after each).
        concurrency: most requests in flight at once.
        batch_size: completions per request.
        headers: extra HTTP headers (e.g. {Authorization: "Bearer ..."}).
    """
    problems = []
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        problems.append(f"url {url!r} is not an http(s) URL")
    if media not in MEDIA_MODES:
        problems.append(f"media {media!r} is not one of {', '.join(MEDIA_MODES)}")
    for key, value, low in (("timeout", timeout, 0), ("backoff", backoff, 0)):
        if not isinstance(value, (int, float)) or value < low or (key == "timeout" and value == 0):
            problems.append(f"{key} {value!r} must be a number {'> 0' if key == 'timeout' else '>= 0'}")
    for key, value, low in (("retries", retries, 0), ("concurrency", concurrency, 1), ("batch_size", batch_size, 1)):
        if not isinstance(value, int) or value < low:
            problems.append(f"{key} {value!r} must be a whole number >= {low}")
    if headers is not None and not isinstance(headers, dict):
        problems.append(f"headers {headers!r} must be a mapping")
    if problems:
        raise RewardError("remote_rm: " + "; ".join(problems) + ".")
    return RemoteReward(url, media=media, timeout=float(timeout), retries=retries, backoff=float(backoff),
                        concurrency=concurrency, batch_size=batch_size, headers=dict(headers or {}))


class RemoteReward:
    """A batched reward that asks an HTTP server (see the module docstring)."""

    __lightrft_reward__ = RewardOptions(batched=True)

    def __init__(self, url: str, *, media: str = "path", timeout: float = 30.0, retries: int = 2,
                 backoff: float = 0.5, concurrency: int = 4, batch_size: int = 16, headers: dict | None = None):
        self.url = url
        self.media = media
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.concurrency = concurrency
        self.batch_size = batch_size
        self.headers = headers or {}

    def __call__(self, inputs: list[RewardInput]) -> list:
        chunks = [inputs[i:i + self.batch_size] for i in range(0, len(inputs), self.batch_size)]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(chunks) or 1)) as pool:
            answers = list(pool.map(self._score_chunk, chunks))
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
        problem, status = "", None
        for attempt in range(1, self.retries + 2):
            retry = True
            try:
                request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    status, answer = response.status, response.read()
                return _scores(answer, n)
            except urllib.error.HTTPError as exc:
                text = exc.read()[:200].decode("utf-8", "replace")
                problem = f"HTTP {exc.code} {exc.reason}: {text!r}"
                retry = exc.code >= 500 or exc.code in _RETRY_STATUS
            except (urllib.error.URLError, OSError) as exc:  # refused, DNS, timeout
                problem = f"no answer ({getattr(exc, 'reason', exc)})"
            except ValueError as exc:
                problem = f"HTTP {status}, but the answer is unusable: {exc}"
            log.debug("remote reward %s: %s (attempt %d of %d)", self.url, problem, attempt, self.retries + 1)
            if not retry:
                break
            if attempt <= self.retries:
                time.sleep(self.backoff * 2 ** (attempt - 1))
        raise RewardError(f"remote reward {self.url}: {problem}; gave up after {attempt} attempt(s), "
                          f"{n} completion(s) get None")


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
