from django.db import models

from tessera_django import purge_on_save


class Product(models.Model):
    name = models.CharField(max_length=100)


purge_on_save(Product, tags=lambda product: [f"product-{product.pk}", "products"])
