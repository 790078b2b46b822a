from django.apps import AppConfig


class TesseraConfig(AppConfig):
    name = "tessera_django"
    verbose_name = "Tessera"
