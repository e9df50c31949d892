"""HTML pages from Jinja2 templates, autoescaped: every value a page shows is escaped unless its template
says otherwise, so a file or sample name can never become markup. Templates live in a `templates` folder
beside the package that owns them (core.outputs' reports, the trainer's evaluation pages)."""

from __future__ import annotations

from functools import cache
from typing import Any

import jinja2


@cache
def _environment(package: str) -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader(package, "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,  # a name the page needs and was not given is an error, not ""
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render_page(package: str, template: str, **context: Any) -> bytes:
    """`package`'s templates/`template` rendered with `context`, as UTF-8 bytes."""
    return _environment(package).get_template(template).render(**context).encode()
