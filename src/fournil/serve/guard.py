"""What every request meets before the API: the host it names, the API key, the size of its body; and after: its
status counted, and a server fault logged with its traceback and answered 500 without details. Also what an unknown
path or a wrong method is told (:func:`http_message`), in both servers.

A plain ASGI middleware (not Starlette's ``BaseHTTPMiddleware``), so that a body is counted as it arrives and refused
past the limit without ever being held whole, and a stream is timed to its end.
"""
from __future__ import annotations

import hmac
import json
import logging
import time

from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

log = logging.getLogger("fournil.serve")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")


class TooLarge(HTTPException):
    """A body that grew past the limit while it was read: the app answers 413 (an HTTPException, which FastAPI lets
    through its body parsing)."""

    def __init__(self, message: str):
        super().__init__(413, message, headers={"Connection": "close"})


def http_message(app, request, e: HTTPException) -> str:
    """What an HTTP error says: for an unknown path, the endpoints there are (the path itself unsaid: it may hold what
    a client should not have sent, a key); for a wrong method, the right one."""
    if e.status_code == 404:
        routes = [f"{'/'.join(sorted(r.methods))} {r.path.replace(':path', '')}" for r in app.routes
                  if isinstance(r, APIRoute)]
        return "no such endpoint: this server answers " + ", ".join(routes)
    if e.status_code == 405 and e.headers and "Allow" in e.headers:
        return f"this endpoint answers {e.headers['Allow']} requests, not {request.method}"
    return str(e.detail)


def error_body(message: str, kind: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}}).encode()


class Guard:
    """``app`` behind the checks. ``hosts``: the Host names answered (None: any); ``open_paths``: what answers without
    the key; ``routes``: the app's, whose requests are counted under their path (``/v1/models/{model}`` for any model
    asked for; an unknown path as ``other``)."""

    def __init__(self, app, metrics, api_key: str | None, max_request_bytes: int, hosts: tuple[str, ...] | None,
                 open_paths: tuple[str, ...], routes: list):
        self.app, self.metrics, self.max_bytes, self.hosts = app, metrics, max_request_bytes, hosts
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.open_paths, self.routes = open_paths, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]
        started = [False]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0], started[0] = message["status"], True
            await send(message)

        async def refuse(code: int, message: str, kind: str, headers: tuple = ()):
            body = error_body(message, kind)
            await sending({"type": "http.response.start", "status": code,
                           "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                       *headers]})
            await send({"type": "http.response.body", "body": body})

        headers = dict(scope["headers"])
        path = scope["path"]
        declared = headers.get(b"content-length", b"")  # the HTTP layer has refused one that is not a number
        try:
            if (reason := self.misdirected(headers.get(b"host", b"").decode("latin-1"))) is not None:
                await refuse(400, reason, "invalid_request_error")
            elif self.expected and path not in self.open_paths and scope["method"] != "OPTIONS" and \
                    not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
                await refuse(401, "missing or wrong API key: send the header Authorization: Bearer KEY",
                             "invalid_api_key")
            elif declared.isdigit() and int(declared) > self.max_bytes:  # refused before a byte of the body is read
                await refuse(413, self.too_large(), "invalid_request_error", ((b"connection", b"close"),))
            else:
                await self.app(scope, self.counted(receive), sending)
        except Exception:  # noqa: BLE001 - the server's own fault: logged whole, answered without its details
            log.exception("internal error answering %s %s", scope["method"], path)
            if not started[0]:
                await refuse(500, "internal server error (the server's log has the details)", "server_error")
        finally:
            route = next((r.path.replace(":path", "") for r in self.routes if r.path_regex.match(path)), "other")
            self.metrics.request(route, status[0], time.perf_counter() - start)

    def misdirected(self, host: str) -> str | None:
        """Why a request naming ``host`` is refused (a web page reaching a loopback server through DNS
        rebinding names its own host), or None."""
        if self.hosts is None:
            return None
        name = host.lower().rsplit(":", 1)[0] if not host.startswith("[") else host.lower().split("]")[0] + "]"
        if name in self.hosts:
            return None
        return (f"this server does not answer for the host {host!r}: it answers {', '.join(self.hosts)}; "
                f"start it with --allowed-hosts {name or 'HOST'} to add one")

    def too_large(self) -> str:
        return (f"the request body is larger than this server takes ({self.max_bytes:,} bytes): send less, or start "
                f"the server with a larger --max-request-bytes")

    def counted(self, receive):
        """``receive``, stopping at the body size limit (a body sent without a Content-Length is counted too)."""
        seen = 0

        async def receiving():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise TooLarge(self.too_large())
            return message

        return receiving
