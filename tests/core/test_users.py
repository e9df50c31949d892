"""Accounts of the review station: argon2 hashes, roles, sign-in refused for wrong or disabled accounts."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import select

from blastq.core.adapters import add_user, authenticate, get_user, set_user
from blastq.core.adapters.db.schema import users_table
from blastq.core.common import InvalidConfig, NotFound

PASSWORD = "correct horse battery"


def name() -> str:
    return f"u{uuid.uuid4().hex[:10]}"


def test_a_password_is_stored_only_as_an_argon2_hash(migrated_db):
    user = add_user(migrated_db, name(), PASSWORD, "technologist", "Ana  Tech")
    with migrated_db.connect() as conn:
        stored = conn.scalar(select(users_table.c.password_hash).where(users_table.c.id == user.id))
    assert stored.startswith("$argon2id$") and PASSWORD not in stored
    assert user.full_name == "Ana Tech"


def test_sign_in_needs_the_right_password_and_an_active_account(migrated_db):
    username = name()
    add_user(migrated_db, username, PASSWORD, "pathologist")
    assert authenticate(migrated_db, username, PASSWORD).role == "pathologist"
    assert authenticate(migrated_db, username, PASSWORD + "x") is None
    assert authenticate(migrated_db, "nobody-" + username, PASSWORD) is None
    set_user(migrated_db, username, active=False)
    assert authenticate(migrated_db, username, PASSWORD) is None
    set_user(migrated_db, username, active=True, password="another long one")
    assert authenticate(migrated_db, username, "another long one") is not None
    assert authenticate(migrated_db, username, PASSWORD) is None


@pytest.mark.parametrize(
    ("username", "password", "role", "message"),
    [
        ("Ana", PASSWORD, "viewer", "username"),
        ("a b", PASSWORD, "viewer", "username"),
        ("", PASSWORD, "viewer", "username"),
        ("ana", "short", "viewer", "at least 10"),
        ("ana", PASSWORD, "root", "role"),
    ],
)
def test_bad_accounts_are_refused_with_the_reason(migrated_db, username, password, role, message):
    with pytest.raises(InvalidConfig, match=message):
        add_user(migrated_db, username, password, role)


def test_a_name_is_taken_once(migrated_db):
    username = name()
    add_user(migrated_db, username, PASSWORD, "viewer")
    with pytest.raises(InvalidConfig, match="exists already"):
        add_user(migrated_db, username, PASSWORD, "admin")
    assert get_user(migrated_db, username).role == "viewer"
    with pytest.raises(NotFound):
        set_user(migrated_db, "nobody-" + username, role="admin")


def test_roles_allow_what_the_lab_expects(migrated_db):
    viewer = add_user(migrated_db, name(), PASSWORD, "viewer")
    tech = add_user(migrated_db, name(), PASSWORD, "technologist")
    path = add_user(migrated_db, name(), PASSWORD, "pathologist")
    admin = add_user(migrated_db, name(), PASSWORD, "admin")
    assert not viewer.may("reclassify") and viewer.may("view")
    assert tech.may("reclassify") and tech.may("complete") and not tech.may("sign off")
    assert path.may("sign off") and path.may("amend")
    assert admin.may("manage users") and not admin.may("sign off")
