from django.db import models

import tessera_django


class Product(models.Model):
    name = models.CharField(max_length=100)
    price_cents = models.IntegerField(default=0)


# Every fragment that shows the product tags itself so (views.product_fragment).
tessera_django.purge_on_save(Product, tags=lambda product: [f"product-{product.pk}"])
