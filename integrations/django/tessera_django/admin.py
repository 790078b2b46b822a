"""The gateway's admin API (``gateway.admin_listen``): purges reach every gateway from
whichever one is asked."""

import json
import urllib.error
import urllib.request
from urllib.parse import quote

from . import conf, markup


class PurgeError(Exception):
    """A purge the gateway refused (``status`` is its HTTP status), or that could not be
    asked for (``status`` is None)."""

    def __init__(self, message, status=None):
        super().__init__(message)
        self.status = status


def purge(tags=None, route=None, fragment=None, params=None, cookies=None, headers=None):
    """Purges on every gateway; returns the gateway's JSON answers, one per purge.

    ``tags``: a tag or a list of them (``DELETE /tags/{tag}``); ``route``: a route name
    (``DELETE /routes/{name}``); ``fragment``: a route name with its ``params``, and for a
    ``vary`` route the ``cookies`` and ``headers`` it was built for
    (``DELETE /fragments/{name}?{params}``). Raises :class:`PurgeError`.
    """
    if tags is None and route is None and fragment is None:
        raise TypeError("name tags=, route= or fragment= to purge")
    if isinstance(tags, str):
        tags = [tags]
    results = [_delete("/tags/" + quote(str(tag), safe="")) for tag in tags or ()]
    if route is not None:
        results.append(_delete("/routes/" + quote(str(route), safe="")))
    if fragment is not None:
        extra = dict(headers or {})
        if cookies:
            extra["Cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
        results.append(_delete(markup.src("/fragments/", fragment, params), extra))
    return results


def _delete(path, headers=None):
    base = str(conf.get("ADMIN_URL")).rstrip("/")
    request = urllib.request.Request(base + path, method="DELETE", headers=dict(headers or {}))
    request.add_header("Accept", "application/json")
    token = conf.get("ADMIN_TOKEN")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=conf.get("ADMIN_TIMEOUT")) as response:
            body = response.read()
    except urllib.error.HTTPError as e:
        detail = e.read()[:300].decode("utf-8", "replace")
        raise PurgeError(f"DELETE {path}: the gateway answered {e.code}: {detail}", status=e.code) from e
    except (OSError, ValueError) as e:
        raise PurgeError(f"DELETE {path}: cannot reach the gateway's admin API at {base} ({e})") from e
    try:
        return json.loads(body)
    except ValueError as e:
        raise PurgeError(f"DELETE {path}: the answer is not JSON ({e})", status=200) from e
