from django.urls import path

from . import views

urlpatterns = [
    path("page", views.page),
    path("plain", views.plain),
    path("login", views.sign_in),
    path("update", views.update),
    path("_render/recs", views.recs),
    path("_render/cart", views.cart),
    path("_render/plain", views.plain_one),
]
