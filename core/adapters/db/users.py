"""Local accounts of the review station: a username, a role, and the password as an argon2 hash only."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from blastq.core.adapters.db.engine import reachable, utcnow
from blastq.core.adapters.db.schema import ROLES, users_table
from blastq.core.common import InvalidConfig, NotFound

USERNAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
MIN_PASSWORD_CHARS = 10
# What each role may do; each role can do what the one before it can, except admin, who manages
# accounts and may reclassify, but signs off nothing: a signature is a pathologist's.
PERMISSIONS: dict[str, frozenset[str]] = {
    "viewer": frozenset({"view"}),
    "technologist": frozenset({"view", "reclassify", "complete"}),
    "pathologist": frozenset({"view", "reclassify", "complete", "sign off", "amend"}),
    "admin": frozenset({"view", "reclassify", "complete", "manage users"}),
}


@dataclass(frozen=True)
class User:
    id: int
    username: str
    full_name: str
    role: str
    active: bool

    def may(self, action: str) -> bool:
        return self.active and action in PERMISSIONS[self.role]


def _hasher():
    from argon2 import PasswordHasher

    return PasswordHasher()


def add_user(engine: Engine, username: str, password: str, role: str, full_name: str = "") -> User:
    """A new account (InvalidConfig for a bad name, role or short password, or a name already taken)."""
    if not USERNAME.fullmatch(username or ""):
        raise InvalidConfig(
            f"username {username!r}: 1 to 64 of a-z, 0-9, '.', '_', '-', starting with a letter or digit"
        )
    if role not in ROLES:
        raise InvalidConfig(f"role {role!r}: one of {', '.join(ROLES)}")
    if len(password) < MIN_PASSWORD_CHARS:
        raise InvalidConfig(f"password: at least {MIN_PASSWORD_CHARS} characters")
    values = {
        "username": username,
        "full_name": " ".join(full_name.split())[:200] or username,
        "role": role,
        "password_hash": _hasher().hash(password),
        "active": True,
        "created_at": utcnow(),
    }
    try:
        with reachable(engine), engine.begin() as conn:
            (user_id,) = conn.execute(insert(users_table).values(**values)).inserted_primary_key
    except IntegrityError:
        raise InvalidConfig(f"user {username!r} exists already", value=username) from None
    return User(user_id, username, values["full_name"], role, True)


def _user(row) -> User:
    return User(row.id, row.username, row.full_name, row.role, row.active)


def get_user(engine: Engine, username: str) -> User | None:
    with reachable(engine), engine.connect() as conn:
        row = conn.execute(select(users_table).where(users_table.c.username == username)).first()
    return None if row is None else _user(row)


def list_users(engine: Engine) -> list[User]:
    with reachable(engine), engine.connect() as conn:
        return [_user(r) for r in conn.execute(select(users_table).order_by(users_table.c.username))]


def authenticate(engine: Engine, username: str, password: str) -> User | None:
    """The active user with this name and password, else None. The hash is checked even for an unknown
    name, so the time taken does not tell which names exist; a hash made with older parameters is
    replaced by one made with the current ones."""
    from argon2.exceptions import InvalidHashError, VerificationError

    hasher = _hasher()
    with reachable(engine), engine.connect() as conn:
        row = conn.execute(select(users_table).where(users_table.c.username == username)).first()
    stored = row.password_hash if row is not None else _dummy_hash()
    try:
        hasher.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return None
    if row is None or not row.active:
        return None
    if hasher.check_needs_rehash(stored):
        with reachable(engine), engine.begin() as conn:
            conn.execute(
                update(users_table)
                .where(users_table.c.id == row.id)
                .values(password_hash=hasher.hash(password))
            )
    return _user(row)


def set_user(
    engine: Engine,
    username: str,
    *,
    role: str | None = None,
    active: bool | None = None,
    password: str | None = None,
) -> User:
    """Change an account's role, whether it may sign in, or its password."""
    values: dict = {}
    if role is not None:
        if role not in ROLES:
            raise InvalidConfig(f"role {role!r}: one of {', '.join(ROLES)}")
        values["role"] = role
    if active is not None:
        values["active"] = active
    if password is not None:
        if len(password) < MIN_PASSWORD_CHARS:
            raise InvalidConfig(f"password: at least {MIN_PASSWORD_CHARS} characters")
        values["password_hash"] = _hasher().hash(password)
    with reachable(engine), engine.begin() as conn:
        if values:
            conn.execute(update(users_table).where(users_table.c.username == username).values(**values))
        row = conn.execute(select(users_table).where(users_table.c.username == username)).first()
    if row is None:
        raise NotFound(f"no user {username!r}", value=username)
    return _user(row)


@cache
def _dummy_hash() -> str:
    """A hash to check unknown names against (made once: hashing is deliberately slow)."""
    return _hasher().hash("not the password of anyone")
