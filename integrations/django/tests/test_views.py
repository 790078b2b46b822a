import io
import os
from unittest import mock

from django.core.management import CommandError, call_command
from django.test import Client, TestCase, override_settings

import tessera_django
from tessera_django import routes

ESI = {"Surrogate-Capability": 'tessera="ESI/1.0"'}


class PageTests(TestCase):
    def test_through_the_gateway_a_page_writes_includes_and_asks_for_esi(self):
        self.client.cookies["csrftoken"] = "x" * 32
        response = self.client.get("/page", headers=ESI)
        self.assertEqual(response["Surrogate-Control"], 'content="ESI/1.0"')
        body = response.content.decode()
        self.assertIn('<esi:include src="/fragments/recs?limit=5&amp;tag=a+b"/>', body)
        self.assertIn('<esi:include src="/fragments/cart"/>', body)
        self.assertNotIn("client.js", body)

    def test_a_form_fragment_without_the_csrf_cookie_is_a_placeholder_and_the_cookie_is_set(self):
        response = self.client.get("/page", headers=ESI)
        body = response.content.decode()
        self.assertIn('<esi:include src="/fragments/recs?limit=5&amp;tag=a+b"/>', body)
        self.assertIn('data-tessera-src="/fragments/cart"', body)
        self.assertEqual(response["Surrogate-Control"], 'content="ESI/1.0"')
        self.assertIn("csrftoken", response.cookies)
        response = self.client.get("/page", headers=ESI)
        self.assertIn('<esi:include src="/fragments/cart"/>', response.content.decode())

    def test_without_the_gateway_a_page_writes_placeholders_and_the_script_once(self):
        response = self.client.get("/page")
        self.assertFalse(response.has_header("Surrogate-Control"))
        body = response.content.decode()
        self.assertIn(
            '<div class="tessera-fragment" data-tessera-src="/fragments/recs?limit=5&amp;tag=a+b">'
            '<div class="tessera-loading">Loading…</div><template class="tessera-fallback">'
            '<div class="tessera-unavailable">This content is unavailable right now.</div></template></div>',
            body,
        )
        self.assertIn(
            '<div class="tessera-fragment" data-tessera-src="/fragments/cart"><b>wait</b>'
            '<template class="tessera-fallback">no &lt;cart&gt;</template></div>',
            body,
        )
        self.assertEqual(body.count('<script src="/_tessera/client.js" defer></script>'), 1)

    def test_a_page_without_fragments_is_not_marked(self):
        self.assertFalse(self.client.get("/plain", headers=ESI).has_header("Surrogate-Control"))

    @override_settings(TESSERA={"FRAGMENT_PREFIX": "/f/"})
    def test_the_prefix_is_configurable(self):
        self.assertIn('data-tessera-src="/f/recs?limit=5', self.client.get("/page").content.decode())


class RenderTests(TestCase):
    def test_render_views_are_shareable_and_tagged(self):
        response = self.client.get("/_render/recs", {"limit": 5})
        self.assertEqual(response.content, b"recs 5")
        self.assertEqual(response["Cache-Control"], "public, max-age=30")
        self.assertEqual(response["Surrogate-Key"], "shelf-1 product-5")
        self.assertFalse(response.has_header("Surrogate-Control"))

        response = self.client.get("/_render/cart")
        self.assertEqual(response["Cache-Control"], "private, max-age=10")
        self.assertFalse(response.has_header("Surrogate-Key"))

    def test_render_token_when_configured(self):
        self.assertEqual(self.client.get("/_render/plain").status_code, 200, "no token: everyone is answered")
        with override_settings(TESSERA={"RENDER_TOKEN": "s3cret"}):
            self.assertEqual(self.client.get("/_render/plain").status_code, 404)
            for wrong in ("s3cre", "s3cret!", "S3CRET"):
                response = self.client.get("/_render/plain", headers={"Tessera-Render-Token": wrong})
                self.assertEqual(response.status_code, 404)
            response = self.client.get("/_render/plain", headers={"Tessera-Render-Token": "s3cret"})
            self.assertEqual((response.status_code, response.content), (200, b"plain"))
            self.assertEqual(self.client.get("/plain").status_code, 200, "pages need no token")

    def test_render_token_from_the_environment(self):
        with mock.patch.dict(os.environ, {"TESSERA_RENDER_TOKEN": "env-token"}):
            response = self.client.get("/_render/plain", headers={"Tessera-Render-Token": "other"})
            self.assertEqual(response.status_code, 404)
            response = self.client.get("/_render/plain", headers={"Tessera-Render-Token": "env-token"})
            self.assertEqual(response.status_code, 200)

    def test_tags_are_checked(self):
        request = mock.Mock(tessera_tags=[])
        with self.assertRaises(ValueError):
            tessera_django.tag(request, "a b")
        with self.assertRaises(ValueError):
            tessera_django.tag(request, *[f"t{i}" for i in range(33)])
        with self.assertRaises(RuntimeError):
            tessera_django.tag(object(), "x")


class CsrfTests(TestCase):
    def browser(self, name):
        browser = Client(enforce_csrf_checks=True)
        browser.post("/login", {"name": name})
        browser.get("/page")
        return browser

    def worker_render(self, browser, route):
        """What the worker sends: only the route's vary cookies."""
        worker = Client()
        for spec in routes.registry[route].vary:
            name = spec.removeprefix("cookie:")
            worker.cookies[name] = browser.cookies[name].value
        response = worker.get(f"/_render/{route}")
        who, token = response.content.decode().split(":", 1)
        return who.removeprefix("cart of "), token.split('value="')[1].split('"')[0]

    def test_a_form_in_a_per_user_fragment_posts(self):
        alice, bob = self.browser("alice"), self.browser("bob")
        who, token = self.worker_render(alice, "cart")
        self.assertEqual(who, "alice")
        self.assertEqual(self.worker_render(bob, "cart")[0], "bob")
        self.assertEqual(alice.post("/update", {"csrfmiddlewaretoken": token}).status_code, 200)
        self.assertEqual(bob.post("/update", {"csrfmiddlewaretoken": token}).status_code, 403)


class RoutesCommandTests(TestCase):
    def test_routes_are_printed_from_the_declarations(self):
        out = io.StringIO()
        call_command("tessera_routes", stdout=out)
        self.assertEqual(
            out.getvalue(),
            "# [[fragment]] routes from the tessera_django.render views (manage.py tessera_routes).\n\n"
            '[[fragment]]\nname = "cart"\nrender = "/_render/cart"\n'
            'vary = ["cookie:sessionid", "cookie:csrftoken"]\nplaceholder = "<p>…</p>"\nfresh = "10s"\n\n'
            '[[fragment]]\nname = "plain_one"\nrender = "/_render/plain"\n\n'
            '[[fragment]]\nname = "recs"\nrender = "/_render/recs"\nparams = ["limit"]\n'
            'fresh = "30s"\nstale = "600s"\n',
        )

    def test_a_render_view_needs_a_url_without_arguments(self):
        @tessera_django.render("unrouted")
        def unrouted(request):
            pass

        try:
            with self.assertRaisesMessage(CommandError, "no URL pattern without arguments leads to"):
                call_command("tessera_routes", stdout=io.StringIO())
        finally:
            del routes.registry["unrouted"]

    def test_a_route_name_belongs_to_one_view(self):
        with self.assertRaisesMessage(ValueError, "already declared by tests.views.recs"):
            tessera_django.render("recs")(lambda request: None)
