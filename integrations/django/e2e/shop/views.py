from django.contrib.auth.decorators import login_required
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

import tessera_django

from .models import Product


def product(request, pk):
    return render(request, "shop/product.html", {"product": get_object_or_404(Product, pk=pk)})


@require_POST
@login_required
def rename(request, pk):
    item = get_object_or_404(Product, pk=pk)
    item.name = request.POST["name"]
    item.save()
    return redirect("product", pk=pk)


# Render views: the gateway's workers GET them, never a browser.


@tessera_django.render("product", params=["id"], fresh=60, stale=600)
def product_fragment(request):
    item = get_object_or_404(Product, pk=request.GET.get("id"))
    tessera_django.tag(request, f"product-{item.pk}")
    return render(request, "fragments/product.html", {"product": item})


# Per user, with a form: varies on the session and on the CSRF cookie its token is
# checked against.
@tessera_django.render("account", params=["product_id"], vary=["session", "csrf"], fresh=60, stale=600)
def account_fragment(request):
    item = get_object_or_404(Product, pk=request.GET.get("product_id"))
    return render(request, "fragments/account.html", {"product": item})
