"""The metrics page for a project's ``urls.py``, guarded like the admin or by a token."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponse, HttpResponseBase, HttpResponseForbidden
from django.views import View
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .collector import ContainerJobCollector
from .snapshot import DEFAULT_WINDOW_SECONDS

PERMISSION = "django_container_celery.view_containerjob"
# Shorter tokens can be guessed; generate one with `python -c "import secrets;
# print(secrets.token_urlsafe(32))"`.
MIN_TOKEN_LENGTH = 24


class MetricsView(View):
    """The metrics in Prometheus' text format, for your ``urls.py``.

    Served to an active staff user who may view container jobs (the admin's own rule),
    and, when ``bearer_token`` is set, to a request carrying ``Authorization: Bearer
    <token>`` (a Prometheus server); anyone else gets 403. ``window_seconds`` is the
    collector's window.
    """

    http_method_names = ["get", "head", "options"]
    bearer_token: str = ""
    window_seconds: float = DEFAULT_WINDOW_SECONDS

    @classmethod
    def as_view(cls, **initkwargs: Any) -> Callable[..., HttpResponseBase]:
        token = initkwargs.get("bearer_token", cls.bearer_token)
        if not isinstance(token, str) or (token and len(token) < MIN_TOKEN_LENGTH):
            raise ImproperlyConfigured(
                f"MetricsView bearer_token must be a string of at least {MIN_TOKEN_LENGTH} "
                "characters (or empty: staff users only)"
            )
        # Fails here, when urls.py is loaded, rather than at the first scrape.
        ContainerJobCollector(initkwargs.get("window_seconds", cls.window_seconds))
        view = super().as_view(**initkwargs)
        # The view decides who may read it (a scraper has a token, not a session), so a
        # project's LoginRequiredMiddleware (Django 5.1+) must not send it to a login page.
        view.login_required = False  # type: ignore[attr-defined]
        return view

    def get(self, request: HttpRequest) -> HttpResponse:
        if not self.allowed(request):
            return HttpResponseForbidden(
                "Metrics need a staff user who may view container jobs, or the bearer token.",
                content_type="text/plain; charset=utf-8",
            )
        registry = CollectorRegistry(auto_describe=False)
        registry.register(ContainerJobCollector(self.window_seconds))
        response = HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
        response["Cache-Control"] = "no-store"
        return response

    def allowed(self, request: HttpRequest) -> bool:
        if self.bearer_token:
            scheme, _space, credentials = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() == "bearer" and hmac.compare_digest(
                credentials.strip().encode(), self.bearer_token.encode()
            ):
                return True
        user = getattr(request, "user", None)
        return bool(
            user is not None and user.is_active and user.is_staff and user.has_perm(PERMISSION)
        )


metrics_view = MetricsView.as_view()
