"""Optional API key (`serve --api-key KEY` / OLLAMA_DISTRIBUTED_API_KEY): every endpoint except `/` and
`/api/version` then needs `Authorization: Bearer KEY` (what OpenAI clients send from `api_key`, and what the
`ollama` clients send from OLLAMA_API_KEY or their `headers`). Without it: 401 in the API's error shape — Ollama's
`{"error": "..."}`, or OpenAI's `{"error": {message, type, param, code: "invalid_api_key"}}` under /v1 (the body
OpenAI itself answers a bad key with). CORS preflights (OPTIONS) pass, so a browser can ask with the header.

A pure ASGI middleware: the check happens before the endpoint runs, so a streaming answer never starts
without the key. The key is compared in constant time (hmac.compare_digest).
"""

from __future__ import annotations

import hmac
import json
from typing import Any, Awaitable, Callable

OPEN_PATHS = frozenset({"/", "/api/version"})

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str) -> None:
        if not api_key:
            raise ValueError("APIKeyMiddleware needs a non-empty key")
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or ()).get(b"authorization", b"")
        if hmac.compare_digest(given.strip(), self._expected):
            await self.app(scope, receive, send)
            return
        message = "missing API key" if not given else "invalid API key"
        if scope["path"].startswith("/v1/"):
            body: Any = {"error": {"message": f"{message}: send 'Authorization: Bearer <key>'",
                                   "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}
        else:
            body = {"error": f"unauthorized: {message}: send 'Authorization: Bearer <key>'"}
        data = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                                (b"www-authenticate", b'Bearer realm="ollama-distributed"')]})
        await send({"type": "http.response.body", "body": data})
