"""What a page writes for a fragment, as plain functions of their inputs."""

import re
from html import escape
from urllib.parse import urlencode

#: Route names the gateway accepts (``[[fragment]] name``).
NAME = re.compile(r"\A[a-z0-9_-]{1,64}\Z")
#: The gateway's own defaults for a route's ``placeholder`` and ``fallback``, so a page
#: that was not composed looks like one whose fragment is still being built.
PLACEHOLDER = '<div class="tessera-loading">Loading…</div>'
FALLBACK = '<div class="tessera-unavailable">This content is unavailable right now.</div>'
CLIENT_SCRIPT = '<script src="/_tessera/client.js" defer></script>'


def esi_capable(capability):
    """Whether a ``Surrogate-Capability`` value (``tessera="ESI/1.0"``, several devices
    comma-separated) names ESI/1.0: only then is an include composed."""
    if not capability:
        return False
    return "ESI/1.0" in re.split(r'[\s,;="]+', capability)


def check_name(name):
    name = str(name)
    if not NAME.match(name):
        raise ValueError(f"fragment name {name!r} is not [a-z0-9_-], 1-64 bytes")
    return name


def src(prefix, name, params=None):
    """The fragment's URL, ``{prefix}{name}?{params}``. List values repeat the
    parameter; None is the empty string. The gateway keeps only allow-listed params."""
    name = check_name(name)
    pairs = []
    for key, value in (params or {}).items():
        values = value if isinstance(value, (list, tuple)) else [value]
        pairs.extend((str(key), "" if v is None else str(v)) for v in values)
    query = urlencode(pairs)
    return f"{prefix}{name}?{query}" if query else f"{prefix}{name}"


def esi_include(url):
    """The include the gateway fills."""
    return f'<esi:include src="{escape(url)}"/>'


def placeholder(url, placeholder_html=PLACEHOLDER, fallback_html=FALLBACK):
    """What the gateway itself writes for a fragment it has not built yet, which
    /_tessera/client.js fills. ``placeholder_html`` and ``fallback_html`` are HTML."""
    return (
        f'<div class="tessera-fragment" data-tessera-src="{escape(url)}">{placeholder_html}'
        f'<template class="tessera-fallback">{fallback_html}</template></div>'
    )
