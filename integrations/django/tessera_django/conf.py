"""Settings: the ``TESSERA`` dict in Django's settings, else the environment.

- ``ADMIN_URL``: the gateway's admin listener (``gateway.admin_listen``); env
  ``TESSERA_ADMIN_URL``, default ``http://127.0.0.1:9090``.
- ``ADMIN_TOKEN``: ``gateway.admin_token``, sent as ``Authorization: Bearer``; env
  ``TESSERA_ADMIN_TOKEN``.
- ``RENDER_TOKEN``: what the fragment workers send in ``Tessera-Render-Token``
  (``workers.render_token``). Set, render views answer 404 to requests without it;
  unset, they answer everyone. Env ``TESSERA_RENDER_TOKEN``.
- ``FRAGMENT_PREFIX``: ``gateway.fragment_prefix``, default ``/fragments/``.
- ``ADMIN_TIMEOUT``: seconds for an admin API call, default 5.

Read on every use, so ``override_settings`` and a changed environment take effect.
"""

import os

from django.conf import settings

DEFAULTS = {
    "ADMIN_URL": "http://127.0.0.1:9090",
    "ADMIN_TOKEN": None,
    "RENDER_TOKEN": None,
    "FRAGMENT_PREFIX": "/fragments/",
    "ADMIN_TIMEOUT": 5,
}
ENV = {
    "ADMIN_URL": "TESSERA_ADMIN_URL",
    "ADMIN_TOKEN": "TESSERA_ADMIN_TOKEN",
    "RENDER_TOKEN": "TESSERA_RENDER_TOKEN",
}


def get(name):
    """The setting ``name``: ``settings.TESSERA[name]``, else its environment variable,
    else its default. Empty strings count as unset."""
    value = getattr(settings, "TESSERA", {}).get(name)
    if value in (None, "") and name in ENV:
        value = os.environ.get(ENV[name], "").strip() or None
    return DEFAULTS[name] if value in (None, "") else value
