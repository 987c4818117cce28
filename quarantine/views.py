from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render


@login_required
def message_list(request: HttpRequest) -> HttpResponse:
    return render(request, "quarantine/list.html", {"rows": []})
