from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.template.loader import render_to_string
from django.views.decorators.http import require_GET


@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return JsonResponse({"status": "ok"})


def bad_request(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    # Rendered without the request: a request refused for its Host header has nothing
    # the page may use (not even the user in the navigation), and the host is never echoed.
    page = render_to_string("error.html", {"title": "Bad request", "code": 400})
    return HttpResponse(page, status=400)


def permission_denied(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    # The exception's text is never shown: the page says what it is, not why.
    return render(
        request,
        "error.html",
        {"title": "Forbidden", "code": 403, "text": "This page is not open to your account."},
        status=403,
    )


def not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    # The requested path is never echoed: it may carry markup.
    return render(request, "error.html", {"title": "Not found", "code": 404}, status=404)


def server_error(request: HttpRequest) -> HttpResponse:
    return render(request, "error.html", {"title": "Server error", "code": 500}, status=500)
