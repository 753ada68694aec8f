"""mkdocs hook: Sphinx cross-reference roles in docstrings become optional API links.

Docstrings write ``:func:`influence_chunks``` or ``:class:`~logix_func.LogStore```; markdown
renders that as ``:func:<code>…</code>``. The hook turns it into an autorefs reference to the
named object (a bare name is looked up under ``logix_func``), shown as code, and linked when the
object is documented on the site; an unknown target stays plain code.
"""

import re

ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|obj|exc):<code>(~?)([\w.]+)</code>")


def _reference(match: re.Match) -> str:
    short, target = match.group(1) == "~", match.group(2)
    identifier = target if "." in target else f"logix_func.{target}"
    title = target.rsplit(".", 1)[-1] if short else target
    return f'<autoref identifier="{identifier}" optional><code>{title}</code></autoref>'


def on_page_content(html: str, **kwargs) -> str:
    return ROLE.sub(_reference, html)
