from django.contrib import admin
from django.urls import path

from django_container_celery.metrics import MetricsView, metrics_view

# The token the metrics tests send as a Prometheus server would; a test value only.
METRICS_TEST_TOKEN = "tests-only-metrics-token-0123456789"

urlpatterns = [
    path("admin/", admin.site.urls),
    path("metrics/", metrics_view),
    path("metrics/scraper/", MetricsView.as_view(bearer_token=METRICS_TEST_TOKEN)),
]
