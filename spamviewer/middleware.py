from collections.abc import Callable

from django.conf import settings
from django.http import HttpRequest, HttpResponse


class SecurityHeadersMiddleware:
    """Content-Security-Policy on every response (Django 5.2 has no setting for it)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        response.setdefault("Content-Security-Policy", settings.CONTENT_SECURITY_POLICY)
        return response


class HealthCheckMiddleware:
    """`GET /healthz` answered before any host or HTTPS check: the probes of compose, the
    Dockerfile and a host's monitoring ask `http://127.0.0.1:8000/healthz`, which
    ALLOWED_HOSTS and HTTPS_ONLY would otherwise refuse (400) or redirect."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.path_info == "/healthz":
            from spamviewer.views import healthz

            response = healthz(request)
            response.setdefault("Content-Security-Policy", settings.CONTENT_SECURITY_POLICY)
            return response
        return self.get_response(request)
