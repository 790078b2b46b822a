from django.core.management.base import BaseCommand, CommandError

from tessera_django.routes import routes_toml


class Command(BaseCommand):
    help = "Print the gateway's [[fragment]] routes from the tessera_django.render views."

    def handle(self, *args, **options):
        try:
            self.stdout.write(routes_toml(), ending="")
        except LookupError as e:
            raise CommandError(str(e)) from e
