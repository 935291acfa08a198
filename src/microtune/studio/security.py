"""The Studio's guards: the same API keys as `microtune serve`, a CSRF token on every POST, and a strict page policy.

Keys come from ``serving.settings.read_api_keys`` ($MICROTUNE_API_KEYS and ``--api-key-file``), so one key file
serves both. A script sends ``Authorization: Bearer <key>``; a browser signs in once on ``/login`` and carries the
key in an HttpOnly, SameSite=Strict cookie. With no key configured the Studio is open — which is why it binds
127.0.0.1 by default. Every POST must carry the per-process CSRF token (a form field or the ``X-CSRF-Token``
header that htmx sends); a page from another origin cannot read it. The Content-Security-Policy allows scripts
from the Studio's own ``/static`` only, so even a value that slipped past escaping could not run.
"""
from __future__ import annotations

import hmac
import secrets
from urllib.parse import parse_qs

from starlette.requests import Request

COOKIE = "microtune_studio_key"
CSRF_FIELD, CSRF_HEADER = "csrf", "x-csrf-token"
OPEN_PATHS = ("/login",)
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; "
       "frame-ancestors 'none'; form-action 'self'; base-uri 'none'")


class Guard:
    """Keys and the CSRF token of one Studio process."""

    def __init__(self, keys: list[str]):
        self.keys = [k for k in keys if k]
        self.csrf = secrets.token_urlsafe(32)

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def valid_key(self, key: str | None) -> bool:
        return bool(key) and any(hmac.compare_digest(key.encode(), k.encode()) for k in self.keys)

    def allowed(self, request: Request) -> bool:
        """No keys configured, an open path, or a valid bearer key / sign-in cookie."""
        if not self.enabled or request.url.path in OPEN_PATHS:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and self.valid_key(token):
            return True
        return self.valid_key(request.cookies.get(COOKIE))

    def csrf_ok(self, request: Request, form: dict[str, str]) -> bool:
        sent = form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER, "")
        return hmac.compare_digest(sent.encode(), self.csrf.encode())


MULTI = ("model",)  # checkbox fields that may repeat: their values come joined by commas (a model ref holds none)


async def read_form(request: Request, limit: int = 200_000) -> dict[str, str]:
    """An urlencoded form body (what browsers and htmx send) as name → last value (``MULTI`` fields: every value, joined by
    commas); bodies over ``limit`` are refused."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ValueError(f"the form is over {limit} bytes")
    parsed = parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True)
    return {k: (",".join(v) if k in MULTI else v[-1]) for k, v in parsed.items()}
