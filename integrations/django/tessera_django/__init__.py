"""Django side of Tessera, the fragment-cache gateway. The gateway proxies the site's
pages and fills their ``<esi:include>``s from its cache; its workers render each
fragment by GETting a render view. This package writes both halves:

- ``templatetags/tessera.py``  ``{% tessera_fragment %}``: the include, or a placeholder
- ``middleware.py``            ``Surrogate-Control`` on pages that wrote an include
- ``decorators.py``            :func:`render`, :func:`tag`: render views
- ``signals.py``               :func:`purge_on_save`: purge a model's tags on commit
- ``admin.py``                 :func:`purge` over the admin API
- ``routes.py``                declared routes, printed by ``manage.py tessera_routes``
- ``markup.py``, ``conf.py``   the markup, as plain functions; settings
"""

from .admin import PurgeError, purge
from .decorators import render, tag
from .signals import purge_on_save

__all__ = ["PurgeError", "purge", "purge_on_save", "render", "tag"]
