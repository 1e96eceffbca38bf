"""Key checks for clients (--api-key, as a bearer token or X-API-Key) and the admin API (--admin-token);
keys are never logged."""

from __future__ import annotations

import hmac
import ipaddress

from aiohttp import web

from lb.errors import Forbidden, Unauthorized


def bearer_token(header: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` header; '' without one."""
    return header[7:].strip() if header is not None and header[:7].lower() == "bearer " else ""


def client_key(authorization: str | None, api_key: str | None) -> str:
    """The key a client presents: the bearer token, else the X-API-Key header (the model server's way)."""
    return bearer_token(authorization) or (api_key or "").strip()


def check_client(authorization: str | None, api_key: str | None, keys: tuple[str, ...]) -> None:
    """Raise Unauthorized unless the client presents one of `keys` (bearer token or X-API-Key)."""
    check_token(client_key(authorization, api_key), keys)


def check_bearer(header: str | None, keys: tuple[str, ...]) -> None:
    """Raise Unauthorized unless `header` is `Bearer <one of keys>`; keys are compared in constant time."""
    check_token(bearer_token(header), keys)


def check_token(token: str, keys: tuple[str, ...]) -> None:
    matched = False
    for key in keys:  # no early exit: the time taken does not reveal which key (if any) matched
        matched |= hmac.compare_digest(token.encode(), key.encode())
    if not token or not matched:
        raise Unauthorized(
            "Incorrect API key. Send it as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'."
            if token
            else "Missing API key. Send it as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'."
        )


def check_admin(request: web.Request, admin_token: str | None) -> None:
    """With a token: the bearer must match. Without one: only loopback clients may change the pool."""
    if admin_token is not None:
        check_bearer(request.headers.get("Authorization"), (admin_token,))
        return
    peer = request.remote or ""
    try:
        loopback = ipaddress.ip_address(peer).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise Forbidden("The admin API answers loopback clients only unless --admin-token is set.")
