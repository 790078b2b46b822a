from django.db import transaction
from django.test import TestCase, override_settings

import tessera_django

from .fake_admin import FakeAdmin
from .models import Product


class PurgeTests(TestCase):
    def setUp(self):
        self.admin = FakeAdmin()
        self.settings_override = override_settings(TESSERA={"ADMIN_URL": self.admin.url, "ADMIN_TOKEN": "adm"})
        self.settings_override.enable()

    def tearDown(self):
        self.settings_override.disable()
        self.admin.stop()

    def test_saves_and_deletes_purge_the_tags_after_commit(self):
        with self.captureOnCommitCallbacks(execute=True):
            product = Product.objects.create(name="a")
            self.assertEqual(self.admin.taken(), [], "nothing before the commit")
        pk = product.pk
        with self.captureOnCommitCallbacks(execute=True):
            product.name = "b"
            product.save()
        with self.captureOnCommitCallbacks(execute=True):
            product.delete()
        requests = self.admin.taken()
        self.assertEqual([r[1] for r in requests], [f"/tags/product-{pk}", "/tags/products"] * 3)
        self.assertEqual({(r[0], r[2]["authorization"]) for r in requests}, {("DELETE", "Bearer adm")})

    def test_a_rolled_back_save_purges_nothing(self):
        with self.captureOnCommitCallbacks(execute=True):
            try:
                with transaction.atomic():
                    Product.objects.create(name="a")
                    raise RuntimeError
            except RuntimeError:
                pass
        self.assertEqual(self.admin.taken(), [])

    def test_a_failed_purge_is_logged_and_the_save_stands(self):
        self.admin.status = 503
        with self.assertLogs("tessera_django", "ERROR") as logs, self.captureOnCommitCallbacks(execute=True):
            product = Product.objects.create(name="kept")
        self.assertIn("answered 503", logs.output[0])
        self.assertTrue(Product.objects.filter(pk=product.pk).exists())

    def test_purge_raises_what_the_gateway_refused(self):
        self.admin.status = 401
        with self.assertRaises(tessera_django.PurgeError) as caught:
            tessera_django.purge(tags="x")
        self.assertEqual(caught.exception.status, 401)
        with override_settings(TESSERA={"ADMIN_URL": "http://127.0.0.1:1"}):
            with self.assertRaisesMessage(tessera_django.PurgeError, "cannot reach the gateway's admin API") as caught:
                tessera_django.purge(route="recs")
        self.assertIsNone(caught.exception.status)

    def test_purge_paths(self):
        with override_settings(TESSERA={"ADMIN_URL": self.admin.url + "/"}):
            results = tessera_django.purge(
                tags=["a%b#c", "é"],
                route="recs",
                fragment="cart",
                params={"id": 7, "q": "x y"},
                cookies={"sessionid": "abc"},
                headers={"Accept-Language": "fr"},
            )
        requests = self.admin.taken()
        self.assertEqual(
            [r[1] for r in requests], ["/tags/a%25b%23c", "/tags/%C3%A9", "/routes/recs", "/fragments/cart?id=7&q=x+y"]
        )
        self.assertEqual(requests[-1][2]["cookie"], "sessionid=abc")
        self.assertEqual(requests[-1][2]["accept-language"], "fr")
        self.assertNotIn("authorization", requests[0][2])
        self.assertEqual(results[2], {"path": "/routes/recs"})
        with self.assertRaises(TypeError):
            tessera_django.purge()
