"""The quarantine pages: list, detail, download, release, delete.

Every view that names a message goes through `_get_message_for_user`, which answers 404
for a message the user cannot see (not 403: a guessed id must not reveal that it exists).
"""

from __future__ import annotations

import re
from datetime import timedelta

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import User
from django.db import connection
from django.db.models import DateTimeField, ExpressionWrapper, F, Q, Value
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_GET, require_POST

from directory.models import Address
from quarantine.deletion import delete_for_addresses, delete_message
from quarantine.forms import ListFilterForm, encode_cursor
from quarantine.models import (
    AuditEvent,
    Category,
    Message,
    Recipient,
    RecipientQuerySet,
    record_event,
)
from quarantine.release import release_message
from quarantine.render import render_message, summarize
from quarantine.store import StoreError, get_store


def _get_message_for_user(request: HttpRequest, mail_id: str) -> Message:
    return get_object_or_404(Message.objects.visible_to(request.user), mail_id=mail_id)


def _get_list_owner(request: HttpRequest, user_id: int | None) -> User | None:
    """The user whose list vadmin looks at (`?user=`); None for one's own list."""
    if user_id is None or not request.user.is_superuser:
        return None
    return get_object_or_404(User, id=user_id)


def _can_release(request: HttpRequest, category: str) -> bool:
    return (
        category != Category.VIRUS
        or request.user.is_superuser
        or settings.RELEASE_VIRUS_BY_USERS
    )


def _back(request: HttpRequest) -> HttpResponse:
    """Back to the page the form was on, if that is a page of this site."""
    target = request.POST.get("next", "")
    if url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ) and target.startswith("/") and not target.startswith(("//", "/\\")):
        return redirect(target)
    return redirect("quarantine:list")


@login_required
@require_GET
def message_list(request: HttpRequest) -> HttpResponse:
    params = ListFilterForm(request.GET).values()
    owner = _get_list_owner(request, params["user"])
    if owner is not None:
        owned = Address.objects.for_user(owner).values("address")
        rows = Recipient.objects.filter(address__in=owned)
    else:
        rows = Recipient.objects.visible_to(request.user)
    if params["category"]:
        rows = rows.filter(category=params["category"])
    # Keyset pagination: one indexed range scan per page and no COUNT(*), whatever the size
    # of the quarantine. One extra row tells whether an older page exists.
    if params["cursor"]:
        when, row_id = params["cursor"]
        rows = rows.filter(Q(received_at__lt=when) | Q(received_at=when, id__lt=row_id))
    rows = rows.newest_first()
    if params["q"]:
        rows = _search(rows, params["q"], params)
    size = settings.QUARANTINE_PAGE_SIZE
    page = list(rows.select_related("message", "released_by")[: size + 1])
    older = None
    if len(page) > size:
        page = page[:size]
        query = request.GET.copy()
        query["cursor"] = encode_cursor(page[-1].received_at, page[-1].id)
        older = query.urlencode()
    newest = request.GET.copy()
    newest.pop("cursor", None)
    for row in page:
        row.summary = summarize(row.message)
        row.can_release = row.released_at is None and _can_release(request, row.category)
    return render(request, "quarantine/list.html", {
        "rows": page,
        "params": params,
        "owner": owner,
        "categories": Category.choices,
        "older_query": older,
        "newest_query": newest.urlencode() if params["cursor"] else None,
        "allowed_download": settings.ALLOWED_DOWNLOAD_TYPES,
        "here": request.get_full_path(),
    })


# Above this many matching messages (or recipient rows), a term is common enough that reading
# the list newest first finds a page of matches soon; below it, the matches are fetched
# through the trigram indexes and sorted.
SEARCH_CANDIDATE_LIMIT = 2000
# pg_trgm finds candidates for a LIKE pattern from the runs of letters and digits in it; a term
# without three in a row gives it nothing to look up.
_TRIGRAM_TERM = re.compile(r"[^\W_]{3}")


def _search(rows: RecipientQuerySet, q: str, params: dict) -> RecipientQuerySet:
    """The rows whose message's Subject, From or To header or whose address contains `q`,
    ignoring case. The indexed header columns and the recipient only; bodies are never
    searched.

    In PostgreSQL, with a term the trigram indexes (migration 0002) can look up, one query
    first asks for at most SEARCH_CANDIDATE_LIMIT + 1 matching messages and as many matching
    rows. Few matches: the page is picked from exactly those, through the indexes, however
    rare the term (a term found nowhere costs two index look-ups, not a scan of the whole
    quarantine). Many matches: the list is read newest first until a page is full.
    """
    if connection.vendor == "sqlite" and not q.isascii():
        # SQLite's LIKE ignores the case of ASCII letters only; its REGEXP (Python's re,
        # registered by Django) ignores the case of every letter, as PostgreSQL's UPPER does.
        lookup, term = "iregex", re.escape(q)
    else:
        lookup, term = "icontains", q
    everywhere = (
        Q(**{f"message__subject__{lookup}": term})
        | Q(**{f"message__from_header__{lookup}": term})
        | Q(**{f"message__to_header__{lookup}": term})
        | Q(**{f"address__{lookup}": term})
    )
    if connection.vendor != "postgresql" or not _TRIGRAM_TERM.search(q):
        return rows.filter(everywhere)
    limit = SEARCH_CANDIDATE_LIMIT
    messages_found = Message.objects.filter(
        Q(subject__icontains=q) | Q(from_header__icontains=q) | Q(to_header__icontains=q)
    )
    if params["category"]:
        messages_found = messages_found.filter(category=params["category"])
    if params["cursor"]:
        # A recipient row carries its message's received_at.
        messages_found = messages_found.filter(received_at__lte=params["cursor"][0])
    rows_found = rows.order_by().filter(address__icontains=q)
    probe = (
        messages_found.annotate(kind=Value(0)).values_list("kind", "id")[: limit + 1]
    ).union(rows_found.annotate(kind=Value(1)).values_list("kind", "id")[: limit + 1], all=True)
    found: tuple[list[int], list[int]] = ([], [])
    for kind, pk in probe:
        found[kind].append(pk)
    message_ids, row_ids = found
    if len(message_ids) > limit or len(row_ids) > limit:
        return rows.filter(everywhere)
    # Sorted by an expression rather than the bare column: otherwise the planner may walk
    # the rcpt_newest index from the newest row hoping to meet these few rows early, and
    # read the whole table when they are old.
    return rows.filter(Q(message_id__in=message_ids) | Q(id__in=row_ids)).order_by(
        ExpressionWrapper(
            F("received_at") + Value(timedelta(0)), output_field=DateTimeField()
        ).desc(),
        "-id",
    )


@login_required
@require_GET
def message_detail(request: HttpRequest, mail_id: str) -> HttpResponse:
    message = _get_message_for_user(request, mail_id)
    try:
        raw = get_store(message.origin).load(message.storage_key).message
    except StoreError:
        raw = None
    recipients = Recipient.objects.filter(message=message).visible_to(request.user)
    recipients = list(recipients.select_related("released_by").order_by("address"))
    return render(request, "quarantine/detail.html", {
        "message": message,
        "summary": summarize(message),
        "rendered": render_message(raw) if raw is not None else None,
        "recipients": recipients,
        "can_download": message.category in settings.ALLOWED_DOWNLOAD_TYPES,
        "can_release": _can_release(request, message.category)
        and any(r.released_at is None for r in recipients),
    })


@login_required
@require_GET
def download(request: HttpRequest, mail_id: str) -> HttpResponse:
    message = _get_message_for_user(request, mail_id)
    if message.category not in settings.ALLOWED_DOWNLOAD_TYPES:
        return _error_page(request, 403, "Forbidden",
                           "Messages of this kind cannot be downloaded.")
    try:
        data = get_store(message.origin).load(message.storage_key).message
    except StoreError:
        return _error_page(request, 404, "Not found", "The stored message cannot be read.")
    record_event(request.user, AuditEvent.Action.DOWNLOAD, mail_id=message.mail_id)
    # The file name is built from the mail_id (letters, digits, - _ +) and never from the
    # mail, so it needs no quoting; the type is ours, never the message's own.
    response = HttpResponse(data, content_type="message/rfc822")
    response["Content-Disposition"] = f'attachment; filename="{message.mail_id}.eml"'
    response["X-Content-Type-Options"] = "nosniff"
    return response


def _error_page(request: HttpRequest, code: int, title: str, text: str) -> HttpResponse:
    return render(request, "error.html", {"title": title, "code": code, "text": text},
                  status=code)


@login_required
@require_POST
def release(request: HttpRequest, mail_id: str) -> HttpResponse:
    message = _get_message_for_user(request, mail_id)
    result = release_message(message, user=request.user)
    (messages.success if result.ok else messages.error)(request, result.text)
    return _back(request)


@login_required
@require_POST
def delete(request: HttpRequest, mail_id: str) -> HttpResponse:
    message = _get_message_for_user(request, mail_id)
    delete_message(message, user=request.user)
    messages.success(request, "Message deleted.")
    return _back(request)


@login_required
@require_POST
def delete_all(request: HttpRequest) -> HttpResponse:
    params = ListFilterForm(request.POST).values()
    owner = _get_list_owner(request, params["user"]) or request.user
    removed = delete_for_addresses(
        Address.objects.for_user(owner).values_list("address", flat=True), user=request.user
    )
    messages.success(request, f"{removed} messages deleted.")
    url = reverse("quarantine:list")
    return redirect(f"{url}?user={owner.id}" if owner != request.user else url)
