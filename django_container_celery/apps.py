from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class ContainerCeleryConfig(AppConfig):
    name = "django_container_celery"
    label = "django_container_celery"
    verbose_name = _("Container jobs")
    default_auto_field = "django.db.models.BigAutoField"
