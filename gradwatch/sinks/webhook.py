"""One POST of an alert to a webhook URL, and what a failed one means for the next attempt.

urllib's default redirect handling turns a POST answered by 301/302/303 into a bodyless GET, which the
webhook then "accepts": every alert would be lost, counted as delivered. Here only 307 and 308 (which
keep the method and the body) are followed; any other redirect is a failed delivery. A 429 or 503 with
``Retry-After`` sets the wait before the next attempt; other 4xx answers are not retried (the request
itself is wrong, asking again changes nothing).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

#: The longest ``Retry-After`` honoured, in seconds: the delivery thread must not stall for longer.
MAX_RETRY_AFTER = 60.0


class _KeepPost(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        if code in (307, 308):  # the same method and body, at the new URL
            return urllib.request.Request(
                newurl, data=req.data, method="POST", headers=dict(req.header_items())
            )
        return None  # 301/302/303: urllib raises HTTPError with that code, a failed delivery


_OPENER = urllib.request.build_opener(_KeepPost)


def post(url: str, payload: dict[str, Any], timeout: float) -> None:
    """POST ``payload`` as JSON; raises on anything but a 2xx answer (after a 307/308, if any)."""
    body = json.dumps(payload, allow_nan=False).encode()
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    with _OPENER.open(request, timeout=timeout) as response:
        response.read()


def retryable(err: Exception) -> bool:
    """Whether another attempt can succeed: not after a 4xx other than 408 and 429, nor a redirect."""
    if isinstance(err, urllib.error.HTTPError):
        return err.code >= 500 or err.code in (408, 429)
    return True


def retry_after(err: Exception) -> float | None:
    """The seconds a 429 or 503 answer's ``Retry-After`` header asks for (capped), else ``None``."""
    if not isinstance(err, urllib.error.HTTPError) or err.code not in (429, 503) or err.headers is None:
        return None
    value = err.headers.get("Retry-After", "")
    try:
        return min(max(float(value), 0.0), MAX_RETRY_AFTER)
    except ValueError:  # an HTTP date: not worth a parser here; the usual backoff applies
        return None
