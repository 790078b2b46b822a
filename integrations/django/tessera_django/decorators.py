"""Render views: what the fragment workers GET to build a fragment.

Each view decorated with :func:`render`

- answers 404 to a request without the render token, when one is configured
  (``RENDER_TOKEN``; constant-time compare);
- answers ``Cache-Control: public, max-age={fresh}`` (``private`` on a ``vary`` route),
  so the gateway stores it: it refuses a private answer on a route shared by everyone;
- sends ``Surrogate-Key`` with the tags given to :func:`tag`.
"""

import functools
import hmac
import re

from django.http import HttpResponseNotFound
from django.utils.cache import patch_cache_control

from . import conf
from .routes import Route, register

#: At most this many distinct tags per fragment, each of token characters and at most
#: 128 bytes, as the gateway checks (a render answer over a limit fails its build).
MAX_TAGS = 32
TAG = re.compile(r"\A[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,128}\Z")


def render(name, params=(), vary=(), **options):
    """Declares the decorated view the render view of route ``name``::

        @tessera_django.render("recommendations", params=["limit"], vary=["session"], fresh=60)
        def recommendations(request): ...

    ``vary``: ``"session"``, ``"csrf"`` (for a fragment with a form: the cookie CSRF
    tokens are checked against), ``"cookie:NAME"``, ``"header:NAME"``. Other options are
    the route's ``[[fragment]]`` keys: ``fresh``, ``stale``, ``refresh_ahead``,
    ``failed_ttl``, ``build_timeout``, ``max_attempts``, ``placeholder``, ``fallback``,
    ``queue``, ``shareable``.
    """

    def decorate(view):
        @functools.wraps(view)
        def render_view(request, *args, **kwargs):
            expected = conf.get("RENDER_TOKEN")
            if expected:
                given = request.headers.get("Tessera-Render-Token", "")
                if not hmac.compare_digest(given.encode(), str(expected).encode()):
                    return HttpResponseNotFound()
            request.tessera_route = route
            request.tessera_tags = []
            response = view(request, *args, **kwargs)
            if route.per_user:
                patch_cache_control(response, private=True, max_age=route.max_age)
            else:
                patch_cache_control(response, public=True, max_age=route.max_age)
            if request.tessera_tags:
                response["Surrogate-Key"] = " ".join(request.tessera_tags)
            return response

        route = Route(name, render_view, params=params, vary=vary, **options)
        register(route)
        return render_view

    return decorate


def tag(request, *tags):
    """Tags the fragment being rendered (``Surrogate-Key``), so
    ``tessera_django.purge(tags=...)`` retires it."""
    if not hasattr(request, "tessera_tags"):
        raise RuntimeError("tessera_django.tag: the view is not a tessera_django.render view")
    names = [str(t) for t in tags]
    bad = [t for t in names if not TAG.match(t)]
    if bad:
        raise ValueError(f"tessera_django.tag: {bad} must be 1-128 token characters")
    for name in names:
        if name not in request.tessera_tags:
            request.tessera_tags.append(name)
    if len(request.tessera_tags) > MAX_TAGS:
        raise ValueError(f"tessera_django.tag: at most {MAX_TAGS} tags per fragment")
