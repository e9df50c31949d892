"""Helpers of the review station tests (importable as `webkit`: pytest puts tests/web on sys.path)."""

from __future__ import annotations

import re

PASSWORDS = {
    "ana": "ana-technologist-pw",
    "pat": "pat-pathologist-pw",
    "vic": "vic-viewer-password",
    "adm": "adm-admin-password",
}
ROLES = {"ana": "technologist", "pat": "pathologist", "vic": "viewer", "adm": "admin"}


def sign_in(client, username: str) -> str:
    """Sign `username` in through the login form; returns the session's CSRF token."""
    page = client.get("/login").text
    token = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    response = client.post(
        "/login",
        data={"username": username, "password": PASSWORDS[username], "csrf": token},
        follow_redirects=False,
    )
    assert response.status_code == 303, response.text
    return re.search(r'name="csrf-token" content="([^"]+)"', client.get("/").text).group(1)
