from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET


@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return JsonResponse({"status": "ok"})


def not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    # The requested path is never echoed: it may carry markup.
    return render(request, "error.html", {"title": "Not found", "code": 404}, status=404)


def server_error(request: HttpRequest) -> HttpResponse:
    return render(request, "error.html", {"title": "Server error", "code": 500}, status=500)
