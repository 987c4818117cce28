from django.contrib.auth.decorators import user_passes_test
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render


def _is_vadmin(user) -> bool:
    return user.is_authenticated and user.is_superuser


@user_passes_test(_is_vadmin)
def console(request: HttpRequest) -> HttpResponse:
    return render(request, "directory/console.html")
