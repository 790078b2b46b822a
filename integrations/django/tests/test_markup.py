import datetime

from django.test import SimpleTestCase, override_settings

from tessera_django import markup
from tessera_django.routes import Route


class MarkupTests(SimpleTestCase):
    def test_capability_names_esi(self):
        self.assertTrue(markup.esi_capable('tessera="ESI/1.0"'))
        self.assertTrue(markup.esi_capable('cdn="ESI-Inline/1.0 ESI/1.0", tessera="x"'))
        self.assertFalse(markup.esi_capable('tessera="ESI/1.01"'))
        self.assertFalse(markup.esi_capable('tessera="XESI/1.0"'))
        self.assertFalse(markup.esi_capable(""))
        self.assertFalse(markup.esi_capable(None))

    def test_src_encodes_params_and_repeats_lists(self):
        self.assertEqual(markup.src("/fragments/", "recs"), "/fragments/recs")
        self.assertEqual(
            markup.src("/fragments/", "recs", {"user_id": 7, "q": "a b", "t": ["x", "&="]}),
            "/fragments/recs?user_id=7&q=a+b&t=x&t=%26%3D",
        )
        self.assertEqual(markup.src("/f/", "x", {"a": None}), "/f/x?a=")

    def test_src_refuses_names_the_gateway_refuses(self):
        for name in ("Recs", "a/b", "x" * 65, ""):
            with self.assertRaises(ValueError):
                markup.src("/fragments/", name)

    def test_markup_escapes_the_src(self):
        self.assertEqual(
            markup.esi_include('/fragments/x?a=1&b="'), '<esi:include src="/fragments/x?a=1&amp;b=&quot;"/>'
        )
        self.assertEqual(
            markup.placeholder("/f/x?a=1&b=2", "L", "F"),
            '<div class="tessera-fragment" data-tessera-src="/f/x?a=1&amp;b=2">L'
            '<template class="tessera-fallback">F</template></div>',
        )


def view():
    pass


class RouteTests(SimpleTestCase):
    def test_toml_of_a_route(self):
        route = Route(
            "cart",
            view,
            params=["a", "b"],
            vary=["session", "csrf", "header:accept-language"],
            fresh=90,
            stale=600.0,
            refresh_ahead="15s",
            failed_ttl=2.5,
            shareable=False,
            max_attempts=3,
            placeholder='<p class="x">\\…\n</p>',
            queue="tessera.build.slow",
        )
        self.assertEqual(
            route.to_toml("/_render/cart"),
            "\n".join(
                [
                    "[[fragment]]",
                    'name = "cart"',
                    'render = "/_render/cart"',
                    'params = ["a", "b"]',
                    'vary = ["cookie:sessionid", "cookie:csrftoken", "header:accept-language"]',
                    "shareable = false",
                    "max_attempts = 3",
                    'placeholder = "<p class=\\"x\\">\\\\…\\u000A</p>"',
                    'queue = "tessera.build.slow"',
                    'fresh = "90s"',
                    'stale = "600000ms"',
                    'refresh_ahead = "15s"',
                    'failed_ttl = "2500ms"',
                ]
            ),
        )
        self.assertEqual(route.max_age, 90)
        self.assertTrue(route.per_user and route.csrf)

    @override_settings(CSRF_USE_SESSIONS=True, SESSION_COOKIE_NAME="sid")
    def test_csrf_in_the_session_varies_on_the_session_once(self):
        self.assertEqual(Route("x", view, vary=["session", "csrf"]).vary, ["cookie:sid"])

    def test_durations(self):
        self.assertEqual(Route("x", view, fresh=datetime.timedelta(minutes=2)).max_age, 120)
        self.assertEqual(Route("x", view, fresh="10m").max_age, 600)
        self.assertEqual(Route("x", view, fresh="1500ms").max_age, 1)
        self.assertEqual(Route("x", view).max_age, 60)

    def test_bad_declarations_are_refused(self):
        with self.assertRaises(ValueError):
            Route("x", view, fresh="soon")
        with self.assertRaises(ValueError):
            Route("x", view, fresh=True)
        with self.assertRaises(ValueError):
            Route("x", view, vary=["user"])
        with self.assertRaises(TypeError):
            Route("x", view, ttl=3)
        with self.assertRaises(ValueError):
            Route("X", view)
