"""Purges a model's tags after each save and delete, once the transaction commits (a
fragment rebuilt between the save and the commit would read the old row and be kept)."""

import logging

from django.db import router, transaction
from django.db.models.signals import post_delete, post_save

from .admin import PurgeError, purge

logger = logging.getLogger("tessera_django")


def log_error(error, instance):
    """The default: the row is saved by then, so the error is logged and the request goes
    on; the fragments are served until their ``fresh`` + ``stale`` run out."""
    logger.error("Tessera purge after saving %s %r failed: %s", type(instance).__name__, instance.pk, error)


def purge_on_save(model, tags, on_error=log_error):
    """Connects ``post_save`` and ``post_delete`` of ``model``: ``tags(instance)`` names
    the tags to purge::

        purge_on_save(Product, tags=lambda product: [f"product-{product.pk}"])
    """

    def handler(sender, instance, **kwargs):
        # Named now: after a delete commits, the instance has lost its pk.
        names = list(dict.fromkeys(str(t) for t in tags(instance) if t is not None))
        if not names:
            return

        def send():
            try:
                purge(tags=names)
            except PurgeError as e:
                on_error(e, instance)

        transaction.on_commit(send, using=router.db_for_write(sender, instance=instance))

    uid = f"tessera_django.purge_on_save.{model._meta.label}"
    post_save.connect(handler, sender=model, weak=False, dispatch_uid=uid)
    post_delete.connect(handler, sender=model, weak=False, dispatch_uid=uid)
    return handler
