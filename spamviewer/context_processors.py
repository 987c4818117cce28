from django.conf import settings
from django.http import HttpRequest


def site(request: HttpRequest) -> dict[str, object]:
    user = getattr(request, "user", None)
    return {
        "is_vadmin": bool(user and user.is_authenticated and user.is_superuser),
        "login_method": settings.LOGIN_METHOD,
    }
