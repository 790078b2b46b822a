from django.contrib.auth import login
from django.contrib.auth.models import User
from django.http import HttpResponse
from django.shortcuts import render
from django.views.decorators.csrf import csrf_exempt

import tessera_django


def page(request):
    return render(request, "tests/page.html", {"nocart": "no <cart>"})


def plain(request):
    return HttpResponse("<p>no fragments</p>")


@csrf_exempt
def sign_in(request):
    user, _ = User.objects.get_or_create(username=request.POST["name"])
    login(request, user)
    return HttpResponse("ok")


def update(request):
    return HttpResponse("updated")


@tessera_django.render("recs", params=["limit"], fresh=30, stale=600)
def recs(request):
    tessera_django.tag(request, "shelf-1", f"product-{request.GET.get('limit')}")
    tessera_django.tag(request, "shelf-1")
    return HttpResponse(f"recs {request.GET.get('limit')}")


@tessera_django.render("cart", vary=["session", "csrf"], fresh="10s", placeholder="<p>…</p>")
def cart(request):
    return render(request, "tests/cart.html")


@tessera_django.render("plain_one")
def plain_one(request):
    return HttpResponse("plain")
