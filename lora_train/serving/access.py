"""Who may do what on the adapter server, which has no user accounts (see "Security model" in docs/serving.md).

- Every request must name an allowed ``Host`` (:class:`HostCheck`): a page on another site that reaches a server on
  127.0.0.1 through DNS rebinding sends its own host name, and is answered 400.
- Loading and unloading adapters (``POST`` / ``DELETE /v1/adapters``) is off unless the operator gives an admin
  token, and then needs ``Authorization: Bearer TOKEN`` (:class:`AdminGate`, compared in constant time).
- A hot load names a run directory under ``--adapter-root`` (:func:`hot_load_source`), or a Hub repo only with
  ``--allow-hub``; anything else gets one message that does not say whether the path exists.
"""

from __future__ import annotations

import hmac
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Optional

from starlette.responses import JSONResponse

from lora_train.inference import REPO_ID
from lora_train.serving.registry import ServingError

ADMIN_TOKEN_ENV = "LORA_SERVE_ADMIN_TOKEN"
"""Environment variable that may hold the admin token (``--admin-token-file`` is the other way)."""
MIN_TOKEN_CHARS = 16
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
ADMIN_PATH = re.compile(r"^/v1/adapters(/[^/]*)?/?$")


@dataclass(frozen=True)
class Access:
    """The operator's choices: the admin token (None: hot load / unload off), where hot loads may read, whether
    they may download from the Hub, and the ``Host`` names the server answers to (``*``: any, behind a gateway
    that checks them)."""

    admin_token: Optional[str] = field(default=None, repr=False)
    adapter_root: Optional[Path] = None
    allow_hub: bool = False
    allowed_hosts: frozenset[str] = frozenset(LOOPBACK_HOSTS)


def host_name(value: str) -> str:
    """The host part of a ``Host`` header, lower case, without the port (``[::1]:8000`` -> ``[::1]``)."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[: end + 1] if end > 0 else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def normal_host(host: str) -> str:
    """An address or name as a ``Host`` header names it: IPv6 literals in brackets."""
    host = host.strip().lower()
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def read_admin_token(token_file: Optional[str]) -> Optional[str]:
    """The admin token from ``token_file`` (first line) or :data:`ADMIN_TOKEN_ENV`; None when neither is set."""
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as err:
            raise ServingError(400, f"--admin-token-file '{token_file}' cannot be read: {err}") from None
        where = f"--admin-token-file '{token_file}'"
    else:
        token = os.environ.get(ADMIN_TOKEN_ENV, "").strip()
        if not token:
            return None
        where = f"${ADMIN_TOKEN_ENV}"
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise ServingError(
            400,
            f"{where} holds no usable admin token: use {MIN_TOKEN_CHARS} or more characters without spaces,"
            ' e.g. python -c "import secrets; print(secrets.token_urlsafe(32))"',
        )
    return token


class HostCheck:
    """ASGI middleware: answer 400 to a request whose ``Host`` header is not an allowed host name."""

    def __init__(self, app, allowed_hosts: frozenset[str]):
        self.app = app
        self.allowed = frozenset(normal_host(h) for h in allowed_hosts)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or "*" in self.allowed:
            return await self.app(scope, receive, send)
        raw = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        if host_name(raw) not in self.allowed:
            response = JSONResponse(
                {
                    "detail": "Host header not allowed; this server answers to "
                    + ", ".join(sorted(self.allowed))
                    + " (the operator adds names with --allowed-host)"
                },
                status_code=400,
            )
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class AdminGate:
    """ASGI middleware: ``POST`` / ``DELETE`` on ``/v1/adapters`` need the admin token, before the body is read.

    403 when the server has no token (hot load / unload off), 401 when the request lacks the right one.
    """

    def __init__(self, app, token: Optional[str]):
        self.app = app
        self.token = token.encode() if token else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "DELETE") or not ADMIN_PATH.match(scope["path"]):
            return await self.app(scope, receive, send)
        if self.token is None:
            response = JSONResponse(
                {
                    "detail": "loading and unloading adapters is off on this server; the operator turns it on by"
                    " starting it with --admin-token-file (see docs/serving.md, Security model)"
                },
                status_code=403,
            )
            return await response(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, credentials = given.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(credentials.strip(), self.token):
            response = JSONResponse(
                {"detail": "missing or wrong admin token: send the header Authorization: Bearer TOKEN"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def hot_load_source(source: str, access: Access) -> tuple[str, str]:
    """(what to read, what to show) for a hot load of ``source``: a run directory under the adapter root, named
    relative to it, or a Hub repo id where the Hub is allowed. Refuses anything else with one message, the same
    for a path that exists and one that does not; reads nothing but the root's own entries."""
    refusal = ServingError(
        400,
        "source must be a run directory under the server's adapter root, named relative to it (e.g. sst2_lora or"
        " sst2_lora/best)"
        + (
            ", or a Hub repo id user/name"
            if access.allow_hub
            else "; Hub repos are off on this server (the operator allows them with --allow-hub)"
        ),
    )
    if access.adapter_root is not None:
        relative = PurePosixPath(source)
        plain = (
            not relative.is_absolute()
            and ".." not in relative.parts
            and not source.startswith("~")
            and "\\" not in source
            and "\x00" not in source
        )
        if plain:
            root = access.adapter_root.resolve()
            candidate = root / relative
            if os.path.lexists(candidate):
                resolved = candidate.resolve()  # symlinks followed: their target must be under the root too
                if resolved != root and resolved.is_relative_to(root) and resolved.is_dir():
                    return str(resolved), relative.as_posix()
                raise refusal
    if access.allow_hub and REPO_ID.match(source) and ".." not in source:
        return source, source
    raise refusal


def hide_root(message: str, access: Access) -> str:
    """``message`` without the adapter root's absolute path (paths under it shown relative to it)."""
    if access.adapter_root is None:
        return message
    return message.replace(str(access.adapter_root.resolve()) + os.sep, "")
