"""Serves the shop with Django's own threaded server on 127.0.0.1, on a port the system
picks, written to $PORT_FILE once listening. Creates and seeds the database ($SHOP_DB)."""

import os
import signal
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shop.settings")

import django  # noqa: E402

django.setup()

from django.contrib.auth.models import User  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.core.servers.basehttp import ThreadedWSGIServer, WSGIRequestHandler  # noqa: E402
from django.core.wsgi import get_wsgi_application  # noqa: E402
from shop.models import Product  # noqa: E402

call_command("migrate", run_syncdb=True, verbosity=0)
for name in ("alice", "bob", "carol"):
    if not User.objects.filter(username=name).exists():
        User.objects.create_user(name, password=f"pw-{name}")
# bulk_create sends no signals: no purge, as no gateway runs yet.
if not Product.objects.exists():
    Product.objects.bulk_create(Product(pk=i, name=f"Product {i}", price_cents=i * 1000) for i in range(1, 4))

server = ThreadedWSGIServer(("127.0.0.1", 0), WSGIRequestHandler)
server.set_app(get_wsgi_application())
signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
with open(os.environ["PORT_FILE"], "w") as f:
    f.write(str(server.server_port))
server.serve_forever()
