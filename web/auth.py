"""Who is asking: signed session cookies, the signed-in user, roles, and CSRF tokens.

A session holds the user's id and a CSRF token, signed with the settings' secret key (itsdangerous, via
Starlette's SessionMiddleware); the user row is read again on every request, so a deactivated account or a
changed role takes effect at once. Every state-changing request carries the session's CSRF token (a form
field or the X-CSRF-Token header) and is refused without it.
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

from fastapi import HTTPException, Request

from blastq.core.adapters import Settings, User, get_user
from blastq.core.common import InvalidConfig

CSRF_HEADER = "X-CSRF-Token"
KEY_FILE = "session-key"


def session_key(settings: Settings) -> str:
    """The key session cookies are signed with: the setting, else one kept under the data dir (made once,
    mode 0600, so sessions survive a restart and every process on the machine shares it)."""
    key = settings.secret_key.get_secret_value()
    if key:
        if len(key) < 32:
            raise InvalidConfig(
                "secret_key: at least 32 characters (e.g. python -c 'import secrets; print(secrets.token_urlsafe(48))')"
            )
        return key
    path = Path(settings.data_dir) / KEY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_text().strip()
        if len(key) < 32:
            raise InvalidConfig(
                "session key file too short: delete it to make a new one", path=str(path)
            ) from None
        return key
    key = secrets.token_urlsafe(48)
    with os.fdopen(fd, "w") as f:
        f.write(key)
    return key


def csrf_token(request: Request) -> str:
    """The session's CSRF token, made on first use."""
    token = request.session.get("csrf")
    if not token:
        token = request.session["csrf"] = secrets.token_urlsafe(32)
    return token


def check_csrf(request: Request, given: str | None) -> None:
    expected = request.session.get("csrf")
    if not expected or not given or not hmac.compare_digest(expected, given):
        raise HTTPException(403, "missing or wrong CSRF token: reload the page")


def signed_in(request: Request) -> User | None:
    """The session's user, if it is still an active account."""
    username = request.session.get("user")
    if not username:
        return None
    user = get_user(request.app.state.db, username)
    if user is None or not user.active:
        request.session.clear()
        return None
    return user


def current_user(request: Request) -> User:
    """FastAPI dependency: the signed-in user, or 401 (pages turn that into the login page)."""
    user = signed_in(request)
    if user is None:
        raise HTTPException(401, "sign in first", headers={"WWW-Authenticate": "Session"})
    return user


def require(user: User, action: str) -> None:
    if not user.may(action):
        raise HTTPException(403, f"a {user.role} may not {action}")


def sign_in(request: Request, user: User) -> None:
    request.session.clear()  # a fresh session (and CSRF token) on every sign-in: no fixation
    request.session["user"] = user.username
    csrf_token(request)
