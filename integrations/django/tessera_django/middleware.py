"""``Surrogate-Control: content="ESI/1.0"`` on answers that wrote an ``<esi:include>``
(the ``tessera_fragment`` tag), and on no other: the gateway composes only answers
that ask, so a page that merely shows user input looking like ESI is left alone."""

#: Set on the request by the template tag when it wrote an include.
ESI_WRITTEN = "_tessera_esi"


class TesseraMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        if getattr(request, ESI_WRITTEN, False):
            response["Surrogate-Control"] = 'content="ESI/1.0"'
        return response
