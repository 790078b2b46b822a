from django.contrib.auth.views import LoginView
from django.urls import path

from . import views

urlpatterns = [
    path("login/", LoginView.as_view(template_name="shop/login.html"), name="login"),
    path("products/<int:pk>/", views.product, name="product"),
    path("products/<int:pk>/rename/", views.rename, name="rename"),
    # Render paths: the gateway's workers GET them; manage.py tessera_routes reads them.
    path("_render/product", views.product_fragment),
    path("_render/account", views.account_fragment),
]
