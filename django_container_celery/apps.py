from django.apps import AppConfig
from django.db.models.signals import post_migrate
from django.utils.translation import gettext_lazy as _


class ContainerCeleryConfig(AppConfig):
    name = "django_container_celery"
    label = "django_container_celery"
    verbose_name = _("Container jobs")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # The Celery layer listens to the engine: results stored whoever ends a job, and
        # the watcher started in every worker. Both only connect signal receivers. The
        # checks of CONTAINER_CELERY register themselves for manage.py check and the
        # worker's start.
        from . import checks, results, worker  # noqa: F401
        from .installation import restore_after_flush

        # flush (between transactional tests) empties the installation table and then sends
        # post_migrate: put back the id that this process labels its containers with.
        post_migrate.connect(restore_after_flush, sender=self, dispatch_uid="dcc-installation")
