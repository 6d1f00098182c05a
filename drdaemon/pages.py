"""Self-contained HTML pages for people (the drill report, the erasure certificate).

One Jinja2 environment over `templates/`, with autoescape and strict undefined
names, so that no page can miss an escape or print a typo as an empty string.
"""

from __future__ import annotations

from typing import Any

import jinja2

_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("drdaemon", "templates"),
    autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def render_template(template: str, **context: Any) -> str:
    """Render one page of templates/ (autoescape, strict)."""
    return str(_TEMPLATES.get_template(template).render(**context))
