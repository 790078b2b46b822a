"""Render views declared with :func:`tessera_django.render`, each one ``[[fragment]]``
route of the gateway's config, whose ``render`` path is read from the URLconf."""

import datetime
import re

from django.conf import settings

#: Options written as TOML keys as they are. Durations: seconds (int or float), a
#: ``timedelta``, or the gateway's own ``"250ms"`` / ``"10s"`` / ``"10m"`` text.
DURATIONS = ("fresh", "stale", "refresh_ahead", "failed_ttl", "build_timeout")
OTHERS = ("shareable", "max_attempts", "placeholder", "fallback", "queue")
DURATION_TEXT = re.compile(r"\A(\d+)(ms|s|m|h|d)\Z")
UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
#: The gateway's default ``fresh``, the render answer's max-age when none is given.
DEFAULT_FRESH = 60

#: Declared routes by name.
registry = {}


class Route:
    """A declared render view."""

    def __init__(self, name, view, params=(), vary=(), **options):
        from .markup import check_name

        self.name = check_name(name)
        unknown = set(options) - set(DURATIONS) - set(OTHERS)
        if unknown:
            raise TypeError(f"tessera render {name!r}: unknown options {sorted(unknown)}")
        self.view = view
        self.params = [str(p) for p in ([params] if isinstance(params, str) else params)]
        self._vary = [vary] if isinstance(vary, str) else list(vary)
        self.options = options
        for key in DURATIONS:
            if key in options:
                self._duration(options[key])
        self.vary  # noqa: B018 - checks the sources now, where the declaration is

    @property
    def vary(self):
        """The ``vary`` sources: ``"session"`` is the session cookie, ``"csrf"`` the
        cookie Django checks CSRF tokens against (the session with
        ``CSRF_USE_SESSIONS``), anything else is written as given."""
        out = []
        for source in self._vary:
            if source == "session":
                source = f"cookie:{settings.SESSION_COOKIE_NAME}"
            elif source == "csrf":
                source = f"cookie:{csrf_cookie_name()}"
            elif not str(source).startswith(("cookie:", "header:")):
                raise ValueError(
                    f"tessera render {self.name!r}: vary {source!r} is neither 'session', "
                    "'csrf', 'cookie:NAME' nor 'header:NAME'"
                )
            if source not in out:
                out.append(source)
        return out

    @property
    def csrf(self):
        """Whether the fragment renders a CSRF token (declared ``vary=["csrf", ...]``)."""
        return "csrf" in self._vary

    @property
    def per_user(self):
        return bool(self._vary)

    @property
    def max_age(self):
        """Seconds the render answer says it may be kept: the route's ``fresh``."""
        if "fresh" not in self.options:
            return DEFAULT_FRESH
        text = self._duration(self.options["fresh"])
        number, unit = DURATION_TEXT.match(text).groups()
        return int(int(number) * UNIT_SECONDS[unit])

    def to_toml(self, render):
        lines = ["[[fragment]]", f"name = {toml(self.name)}", f"render = {toml(render)}"]
        if self.params:
            lines.append(f"params = {toml(self.params)}")
        if self.vary:
            lines.append(f"vary = {toml(self.vary)}")
        lines += [f"{key} = {toml(self.options[key])}" for key in OTHERS if key in self.options]
        lines += [f"{key} = {toml(self._duration(self.options[key]))}" for key in DURATIONS if key in self.options]
        return "\n".join(lines)

    def _duration(self, value):
        if isinstance(value, str):
            if DURATION_TEXT.match(value):
                return value
        elif isinstance(value, datetime.timedelta):
            return f"{int(value.total_seconds())}s"
        elif isinstance(value, bool):
            pass
        elif isinstance(value, int):
            return f"{value}s"
        elif isinstance(value, float):
            return f"{round(value * 1000)}ms"
        raise ValueError(
            f"tessera render {self.name!r}: duration {value!r} is not seconds or like '250ms', '10s', '10m'"
        )


def csrf_cookie_name():
    return settings.SESSION_COOKIE_NAME if settings.CSRF_USE_SESSIONS else settings.CSRF_COOKIE_NAME


def register(route):
    known = registry.get(route.name)
    if known is not None and _where(known.view) != _where(route.view):
        raise ValueError(f"tessera render {route.name!r}: already declared by {_where(known.view)}")
    registry[route.name] = route


def _where(view):
    return f"{view.__module__}.{view.__qualname__}"


def toml(value):
    """A TOML value: basic strings (escaped as TOML 1.0 says), lists, ints, booleans."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)

    def escape(match):
        c = match.group(0)
        return {"\\": "\\\\", '"': '\\"'}.get(c) or f"\\u{ord(c):04X}"

    return '"' + re.sub(r'[\\"\x00-\x1f\x7f]', escape, str(value)) + '"'


def routes_toml():
    """Every declared route as ``[[fragment]]`` tables, ``render`` reversed from the
    URLconf (which is imported first, so every render view is declared)."""
    from django.urls import NoReverseMatch, get_resolver, reverse

    get_resolver().url_patterns  # noqa: B018 - imports the views, which declare the routes
    tables = []
    for name in sorted(registry):
        route = registry[name]
        try:
            path = reverse(route.view)
        except NoReverseMatch:
            raise LookupError(
                f"tessera render {name!r}: no URL pattern without arguments leads to "
                f"{_where(route.view)}; add one to the URLconf (values go in params)"
            ) from None
        tables.append(route.to_toml(path))
    header = "# [[fragment]] routes from the tessera_django.render views (manage.py tessera_routes).\n"
    return header + ("\n" + "\n\n".join(tables) + "\n" if tables else "# (no render views declared)\n")
