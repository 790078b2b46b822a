"""End to end: the shop in e2e/shop behind a real tessera-gateway (embedded mode: no
memcached or RabbitMQ), configured with the routes ``manage.py tessera_routes`` prints.

    python e2e/test_e2e.py   (TESSERA_GATEWAY_BIN: the gateway; default target/debug)
"""

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest
from urllib.parse import urlencode, urlsplit

# RENDER-TOKEN: the gateway's workers send it in `Tessera-Render-Token`
# (workers.render_token / TESSERA_RENDER_TOKEN). It is given to the site and to the
# gateway, and test_render_path_refuses_requests_without_the_token checks the refusal
# (None turns it off).
RENDER_TOKEN = "e2e-render-secret"

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "../../.."))
GATEWAY = os.environ.get("TESSERA_GATEWAY_BIN", os.path.join(REPO, "target/debug/tessera-gateway"))
ADMIN_TOKEN = "e2e-admin-token"
WAIT = {"Prefer": "wait=20"}


class GatewayExited(RuntimeError):
    pass


class Shop:
    """The site and the gateway in front of it, started once for all tests."""

    def start(self):
        """The gateway's admin port is picked before the site starts (the site is told
        it), so another process may take it meanwhile: then everything starts again."""
        for attempt in range(3):
            try:
                return self.start_once()
            except GatewayExited:
                self.stop()
                if attempt == 2:
                    raise

    def start_once(self):
        self.dir = tempfile.mkdtemp(prefix="tessera-django-e2e")
        self.procs = []
        admin_port = free_port()
        self.admin_url = f"http://127.0.0.1:{admin_port}"
        env = dict(
            os.environ,
            DJANGO_SETTINGS_MODULE="shop.settings",
            SHOP_DB=os.path.join(self.dir, "shop.sqlite3"),
            TESSERA_ADMIN_URL=self.admin_url,
            TESSERA_ADMIN_TOKEN=ADMIN_TOKEN,
            TESSERA_RENDER_TOKEN=RENDER_TOKEN or "",
            PORT_FILE=os.path.join(self.dir, "app.port"),
        )
        self.spawn([sys.executable, "serve.py"], env, "app.log", cwd=HERE)
        port = self.wait_for(lambda: read(env["PORT_FILE"]), "the site", "app.log")
        self.app_url = f"http://127.0.0.1:{port}"

        routes = subprocess.run(
            [sys.executable, "manage.py", "tessera_routes"], cwd=HERE, env=env, capture_output=True, text=True
        )
        if routes.returncode != 0:
            raise RuntimeError(f"manage.py tessera_routes failed:\n{routes.stdout}{routes.stderr}")
        config = os.path.join(self.dir, "tessera.toml")
        with open(config, "w") as f:
            f.write(
                f'[gateway]\nlisten = "127.0.0.1:0"\nadmin_listen = "127.0.0.1:{admin_port}"\n'
                f'admin_token = "{ADMIN_TOKEN}"\n\n[upstream]\nurl = "{self.app_url}"\n\n' + routes.stdout
            )
        if not os.access(GATEWAY, os.X_OK):
            raise RuntimeError(f"no gateway at {GATEWAY}: cargo build -p tessera-gateway")
        check = subprocess.run([GATEWAY, "--config", config, "check"], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"the gateway refuses the config:\n{check.stdout}{check.stderr}")

        # RUST_LIB_BACKTRACE=0: an error exit (a port taken) is not held up symbolizing a
        # backtrace of the debug build; panics still have theirs.
        genv = dict(
            os.environ,
            TESSERA_LOG_FORMAT="json",
            RUST_LOG="info",
            RUST_LIB_BACKTRACE="0",
            TESSERA_RENDER_TOKEN=RENDER_TOKEN or "",
        )
        gateway = self.spawn([GATEWAY, "--config", config], genv, "gateway.log")
        addr = self.wait_for(self.gateway_addr, "the gateway", "gateway.log", gateway)
        self.gateway_url = f"http://{addr}"

    def gateway_addr(self):
        for line in (read(os.path.join(self.dir, "gateway.log")) or "").splitlines():
            if '"gateway listening"' in line:
                return json.loads(line)["addr"]
        return None

    def spawn(self, argv, env, log, cwd=None):
        with open(os.path.join(self.dir, log), "w") as out:
            self.procs.append(subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT))
        return self.procs[-1]

    def wait_for(self, probe, what, log, gateway=None):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            value = probe()
            if value:
                return value
            if gateway is not None and gateway.poll() is not None:
                raise GatewayExited(f"{what} exited:\n{self.logs([log])}")
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.1)
        raise RuntimeError(f"{what} did not start:\n{self.logs([log])}")

    def logs(self, names=("app.log", "gateway.log")):
        out = []
        for name in names:
            lines = (read(os.path.join(self.dir, name)) or "(none)\n").splitlines()[-40:]
            out.append(f"---- {name} (last 40 lines)\n" + "\n".join(lines))
        return "\n".join(out)

    def stop(self):
        for proc in reversed(self.procs):
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if not os.environ.get("TESSERA_E2E_KEEP"):
            shutil.rmtree(self.dir, ignore_errors=True)


def read(path):
    try:
        with open(path) as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Browser:
    """A browser, as far as cookies go."""

    def __init__(self, base):
        self.base = urlsplit(base)
        self.cookies = {}

    def get(self, path, headers=None):
        return self.request("GET", path, None, headers or {})

    def post(self, path, form, headers=None):
        body = urlencode(form)
        headers = dict(headers or {}, **{"Content-Type": "application/x-www-form-urlencoded"})
        return self.request("POST", path, body, headers)

    def request(self, method, path, body, headers):
        if self.cookies:
            headers = dict(headers, Cookie="; ".join(f"{k}={v}" for k, v in self.cookies.items()))
        conn = http.client.HTTPConnection(self.base.hostname, self.base.port, timeout=30)
        try:
            conn.request(method, path, body, headers)
            response = conn.getresponse()
            response.text = response.read().decode()
        finally:
            conn.close()
        for line in response.headers.get_all("Set-Cookie") or []:
            name, value = line.split(";", 1)[0].split("=", 1)
            self.cookies[name] = value
        return response


def csrf_token(html):
    match = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', html)
    if not match:
        raise AssertionError(f"no csrfmiddlewaretoken in:\n{html}")
    return match.group(1)


shop = Shop()


def setUpModule():
    try:
        shop.start()
    except BaseException:
        shop.stop()
        raise


def tearDownModule():
    shop.stop()


class EndToEnd(unittest.TestCase):
    logs_shown = False

    def run(self, result=None):
        failures = len(result.failures) + len(result.errors) if result else 0
        out = super().run(result)
        if result and len(result.failures) + len(result.errors) > failures and not EndToEnd.logs_shown:
            EndToEnd.logs_shown = True
            print("\n" + shop.logs(), file=sys.stderr)
        return out

    def fragment(self, browser, src):
        """The fragment, waiting for its build."""
        response = browser.get(src, WAIT)
        self.assertEqual(response.status, 200, f"{src}: {response.text}")
        return response.text

    def sign_in(self, name, product):
        browser = Browser(shop.gateway_url)
        login = browser.get("/login/")
        response = browser.post(
            "/login/", {"username": name, "password": f"pw-{name}", "csrfmiddlewaretoken": csrf_token(login.text)}
        )
        self.assertEqual(response.status, 302, response.text)
        browser.get(f"/products/{product}/")  # queues the builds of this user's fragments
        self.fragment(browser, f"/fragments/account?product_id={product}")
        self.fragment(browser, f"/fragments/product?id={product}")
        return browser

    def test_the_page_is_composed(self):
        browser = Browser(shop.gateway_url)
        first = browser.get("/products/1/").text
        # No CSRF cookie yet: the form fragment is left to the browser, which then has one.
        self.assertIn('data-tessera-src="/fragments/account?product_id=1"', first)
        self.assertIn("csrftoken", browser.cookies)
        self.fragment(browser, "/fragments/product?id=1")
        self.fragment(browser, "/fragments/account?product_id=1")
        page = browser.get("/products/1/")
        self.assertEqual(page.status, 200)
        self.assertIn("<h2>Product 1</h2>", page.text)
        self.assertIn('<a href="/login/">Sign in</a>', page.text)
        self.assertNotIn("esi:include", page.text)
        self.assertNotIn("tessera-fragment", page.text)
        self.assertIsNone(page.getheader("Surrogate-Control"))
        self.assertIsNone(page.getheader("Surrogate-Key"))

        crawler = Browser(shop.gateway_url).get("/products/1/").text  # keeps no cookies
        self.assertIn("<h2>Product 1</h2>", crawler)
        self.assertIn('data-tessera-src="/fragments/account?product_id=1"', crawler)

    def test_without_the_gateway_the_page_has_placeholders(self):
        page = Browser(shop.app_url).get("/products/1/")
        self.assertIn('data-tessera-src="/fragments/product?id=1"', page.text)
        self.assertIn('<script src="/_tessera/client.js" defer></script>', page.text)
        self.assertIsNone(page.getheader("Surrogate-Control"))

    def test_users_see_their_own_fragment_and_its_form_posts_and_purges(self):
        alice, bob = self.sign_in("alice", 2), self.sign_in("bob", 2)
        alice_page = alice.get("/products/2/").text
        self.assertIn('Signed in as <b class="user">alice</b>', alice_page)
        self.assertIn('Signed in as <b class="user">bob</b>', bob.get("/products/2/").text)
        self.assertNotIn("tessera-fragment", alice_page)
        before = re.search(r"rendered ([^<]+)", alice_page).group(1)

        # The form came from alice's cached fragment; its token must pass Django's check.
        form = {"csrfmiddlewaretoken": csrf_token(alice_page), "name": "Renamed by alice"}
        renamed = alice.post("/products/2/rename/", form)
        self.assertEqual(renamed.status, 302, renamed.text)

        # The save purged tag product-2: the product fragment is built anew.
        self.assertIn("<h2>Renamed by alice</h2>", self.fragment(alice, "/fragments/product?id=2"))
        page = bob.get("/products/2/").text
        self.assertIn("<h2>Renamed by alice</h2>", page)
        self.assertNotEqual(before, re.search(r"rendered ([^<]+)", page).group(1))
        self.assertGreaterEqual(self.purges_made(), 1)

    def test_a_post_with_another_users_token_is_refused(self):
        carol, bob = self.sign_in("carol", 3), self.sign_in("bob", 3)
        token = csrf_token(bob.get("/products/3/").text)
        response = carol.post("/products/3/rename/", {"csrfmiddlewaretoken": token, "name": "x"})
        self.assertEqual(response.status, 403)

    def test_render_path_refuses_requests_without_the_token(self):
        app = Browser(shop.app_url)
        if RENDER_TOKEN:
            self.assertEqual(app.get("/_render/product?id=1").status, 404)
            self.assertEqual(app.get("/_render/product?id=1", {"Tessera-Render-Token": RENDER_TOKEN}).status, 200)
            # Through the gateway render paths are closed, whatever a client sends.
            gateway = Browser(shop.gateway_url)
            self.assertEqual(gateway.get("/_render/product/?id=1", {"Tessera-Render-Token": RENDER_TOKEN}).status, 404)
        else:
            self.assertEqual(app.get("/_render/product?id=1").status, 200, "no token: render paths answer everyone")

    def purges_made(self):
        admin = urlsplit(shop.admin_url)
        conn = http.client.HTTPConnection(admin.hostname, admin.port, timeout=10)
        conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        metrics = conn.getresponse().read().decode()
        conn.close()
        match = re.search(r"^tessera_tag_purges_total (\d+)", metrics, re.M)
        return int(match.group(1)) if match else 0


if __name__ == "__main__":
    unittest.main(verbosity=2)
