"""The review station's commands: blastq serve, blastq users add|list|set.

Parse, call blastq.web.app.create_app (served by uvicorn) or the accounts in core.adapters, print.
"""

from __future__ import annotations

import sys

import click

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
ROLES = ("viewer", "technologist", "pathologist", "admin")  # core.adapters ROLES; no import at --help


@click.command(context_settings=CONTEXT)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: all).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="Port.")
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Server processes (one is enough for a lab; they share sessions through the one key).",
)
def serve(host: str, port: int, workers: int) -> None:
    """Run the review station: worklist, cell gallery, sign-off, reports, LIS export.

    \b
    Serves the database and store the workers write (BLASTQ_DATABASE_URL, BLASTQ_STORE_URL; by default
    the local ones `blastq run` records in). Sign in with an account made by `blastq users add`;
    nothing but /healthz answers without one. The JSON API's schema: /api/openapi.json.
    Example:
      blastq users add ana --role technologist
      blastq serve --port 8000        # then open http://127.0.0.1:8000
    """
    import uvicorn

    from blastq.core.adapters import check_local_folders, list_users, load_settings
    from blastq.core.adapters import connect as connect_db
    from blastq.web.auth import session_key

    settings = load_settings()
    check_local_folders(settings)
    _check_port(host, port)
    session_key(settings)  # made (or checked) before the workers start, so they share one
    if not list_users(connect_db(settings.database_url.get_secret_value())):
        click.echo("WARNING no accounts yet: add one with `blastq users add NAME --role ROLE`", err=True)
    click.echo(f"review station on http://{host}:{port}/ (stop with Ctrl+C)", err=True)
    uvicorn.run("blastq.web.main:app", host=host, port=port, workers=workers, log_level="info", factory=False)


def _check_port(host: str, port: int) -> None:
    """One line, before anything starts, when the address cannot be listened on (in use, not this
    machine's): uvicorn would print its own traceback-like lines after the application had started."""
    import socket

    from blastq.core.common import InvalidConfig

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise InvalidConfig(f"--host {host}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise InvalidConfig(
                f"cannot listen on {host}:{port}: {exc.strerror} (another blastq serve?)"
            ) from None


@click.group(context_settings=CONTEXT)
def users() -> None:
    """Accounts of the review station (viewer, technologist, pathologist, admin)."""


def _db():
    from blastq.core.adapters import connect, load_settings

    return connect(load_settings().database_url.get_secret_value())


def _password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    return click.prompt("Password", hide_input=True, confirmation_prompt=True)


@users.command("add", context_settings=CONTEXT)
@click.argument("username")
@click.option("--role", required=True, type=click.Choice(ROLES), help="What the account may do.")
@click.option("--name", "full_name", default="", help="The person's full name, shown on reports.")
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of stdin.")
def users_add(username: str, role: str, full_name: str, password_stdin: bool) -> None:
    """Add an account. Technologists reclassify and complete reviews; pathologists also sign off and
    amend; viewers only look; admins manage accounts and may reclassify but sign nothing."""
    from blastq.core.adapters import add_user

    user = add_user(_db(), username, _password(password_stdin), role, full_name)
    click.echo(f"added {user.username} ({user.role})")


@users.command("list", context_settings=CONTEXT)
def users_list() -> None:
    """Every account, its role, and whether it may sign in."""
    from blastq.core.adapters import list_users

    for u in list_users(_db()):
        click.echo(f"{u.username}\t{u.role}\t{'active' if u.active else 'disabled'}\t{u.full_name}")


@users.command("set", context_settings=CONTEXT)
@click.argument("username")
@click.option("--role", type=click.Choice(ROLES), help="A new role.")
@click.option(
    "--disable", "active", flag_value=False, default=None, help="The account may no longer sign in."
)
@click.option("--enable", "active", flag_value=True, help="The account may sign in again.")
@click.option("--password", "new_password", is_flag=True, help="Set a new password (prompted).")
@click.option("--password-stdin", is_flag=True, help="Read the new password from the first line of stdin.")
def users_set(
    username: str, role: str | None, active: bool | None, new_password: bool, password_stdin: bool
) -> None:
    """Change an account's role, password, or whether it may sign in (accounts are never deleted: the
    audit trail names them)."""
    from blastq.core.adapters import set_user

    password = _password(password_stdin) if (new_password or password_stdin) else None
    user = set_user(_db(), username, role=role, active=active, password=password)
    click.echo(f"{user.username}: {user.role}, {'active' if user.active else 'disabled'}")


def register(main: click.Group) -> None:
    main.add_command(serve)
    main.add_command(users)
