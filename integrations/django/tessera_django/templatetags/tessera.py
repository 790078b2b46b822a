"""``{% load tessera %}{% tessera_fragment "recommendations" limit=5 %}``."""

from django import template
from django.middleware.csrf import get_token
from django.utils.html import conditional_escape
from django.utils.safestring import mark_safe

from .. import conf, markup
from ..middleware import ESI_WRITTEN
from ..routes import csrf_cookie_name, registry

register = template.Library()
CLIENT_WRITTEN = "_tessera_client_js"


@register.simple_tag(takes_context=True)
def tessera_fragment(context, name, placeholder=None, fallback=None, **params):
    """The fragment ``name`` with ``params`` (the route's allow-listed query params).

    Through the gateway (the request's ``Surrogate-Capability`` names ESI/1.0) this is an
    ``<esi:include>``, filled before the page leaves the gateway. Otherwise it is the
    placeholder /_tessera/client.js fills from the browser, with the script once per
    page; so is a form fragment (``vary=["csrf"]``) when the browser has no CSRF cookie
    yet: the gateway would build it for no cookie, and this page's answer sets one (it
    is asked for here), which the browser then sends for the fragment. ``placeholder``
    and ``fallback`` are HTML (escaped unless safe; template string literals are).
    """
    request = context.get("request") or getattr(context, "request", None)
    if request is None:
        raise template.TemplateSyntaxError(
            "tessera_fragment needs the request: render with a RequestContext "
            "(the django.template.context_processors.request context processor)"
        )
    url = markup.src(conf.get("FRAGMENT_PREFIX"), name, params)
    capable = markup.esi_capable(request.headers.get("Surrogate-Capability"))
    if capable and not _cookie_missing(request, registry.get(str(name))):
        setattr(request, ESI_WRITTEN, True)
        return mark_safe(markup.esi_include(url))
    html = markup.placeholder(
        url,
        markup.PLACEHOLDER if placeholder is None else conditional_escape(placeholder),
        markup.FALLBACK if fallback is None else conditional_escape(fallback),
    )
    if not getattr(request, CLIENT_WRITTEN, False):
        setattr(request, CLIENT_WRITTEN, True)
        html += markup.CLIENT_SCRIPT
    return mark_safe(html)


def _cookie_missing(request, route):
    """Whether the route renders a form and the request lacks the CSRF cookie, which is
    then asked for, so this page's answer sets it."""
    if route is None or not route.csrf or csrf_cookie_name() in request.COOKIES:
        return False
    get_token(request)
    return True
