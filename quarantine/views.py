"""The quarantine pages: list, detail, download, release, delete.

Every view that names a message goes through `_get_message_for_user`, which answers 404
for a message the user cannot see (not 403: a guessed id must not reveal that it exists).
"""

from __future__ import annotations

import re
from collections import defaultdict
from datetime import timedelta

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import User
from django.db import connection
from django.db.models import (
    DateTimeField,
    Exists,
    ExpressionWrapper,
    F,
    Max,
    OuterRef,
    Q,
    Value,
)
from django.http import HttpRequest, HttpResponse, QueryDict
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from directory.models import Address
from quarantine.deletion import delete_copies, delete_for_addresses, delete_message
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


def _acting_owner(request: HttpRequest) -> User | None:
    """The user whose copies a row action on vadmin's view of one user's list acts on (the
    form's `user`); None: the action acts on everything the acting user may act on."""
    return _get_list_owner(request, ListFilterForm(request.POST).values()["user"])


def _list_query(request: HttpRequest, params: dict) -> str:
    """The list's query string (user, search, category, page) rebuilt from validated
    parameters only, so that a link back to the list can carry nothing else."""
    query = QueryDict(mutable=True)
    if params["user"] is not None and request.user.is_superuser:
        query["user"] = str(params["user"])
    if params["q"]:
        query["q"] = params["q"]
    if params["category"]:
        query["category"] = params["category"]
    if params["cursor"]:
        query["cursor"] = encode_cursor(*params["cursor"])
    return query.urlencode()


def _with_query(url: str, query: str) -> str:
    return f"{url}?{query}" if query else url


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
        scope = Recipient.objects.filter(address__in=owned)
    else:
        scope = Recipient.objects.visible_to(request.user)
    rows = scope
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
    # One row per message, however many of the listed addresses it was sent to: the row of
    # its first recipient (in the scope, matching the search). A message's recipients share
    # its received_at, so the keyset cursor of that row orders the messages as before.
    earlier = scope.filter(message_id=OuterRef("message_id"), id__lt=OuterRef("id"))
    if params["q"]:
        earlier = earlier.filter(_matches(params["q"]))
    rows = rows.filter(~Exists(earlier))
    size = settings.QUARANTINE_PAGE_SIZE
    page = list(rows.select_related("message")[: size + 1])
    older = None
    if len(page) > size:
        page = page[:size]
        query = request.GET.copy()
        query["cursor"] = encode_cursor(page[-1].received_at, page[-1].id)
        older = query.urlencode()
    newest = request.GET.copy()
    newest.pop("cursor", None)
    # The row shows, and its actions act on, every recipient of the message in the scope:
    # the user's addresses it was sent to (vadmin's whole list: all of them).
    copies = defaultdict(list)
    in_page = scope.filter(message_id__in=[row.message_id for row in page])
    for copy in in_page.select_related("released_by").order_by("address", "id"):
        copies[copy.message_id].append(copy)
    for row in page:
        row.summary = summarize(row.message)
        row.copies = copies[row.message_id] or [row]
        row.released = [copy for copy in row.copies if copy.released_at is not None]
        row.can_release = len(row.released) < len(row.copies) and _can_release(
            request, row.category
        )
    return render(request, "quarantine/list.html", {
        "rows": page,
        "params": params,
        "owner": owner,
        "categories": Category.choices,
        "older_query": older,
        "newest_query": newest.urlencode() if params["cursor"] else None,
        "allowed_download": settings.ALLOWED_DOWNLOAD_TYPES,
        "here": request.get_full_path(),
        "list_query": _list_query(request, params),
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
    everywhere = _matches(q)
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


def _matches(q: str) -> Q:
    """Rows whose message's Subject, From or To header or whose address contains `q`."""
    if connection.vendor == "sqlite" and not q.isascii():
        # SQLite's LIKE ignores the case of ASCII letters only; its REGEXP (Python's re,
        # registered by Django) ignores the case of every letter, as PostgreSQL's UPPER does.
        lookup, term = "iregex", re.escape(q)
    else:
        lookup, term = "icontains", q
    return (
        Q(**{f"message__subject__{lookup}": term})
        | Q(**{f"message__from_header__{lookup}": term})
        | Q(**{f"message__to_header__{lookup}": term})
        | Q(**{f"address__{lookup}": term})
    )


@login_required
@require_GET
def message_detail(request: HttpRequest, mail_id: str) -> HttpResponse:
    message = _get_message_for_user(request, mail_id)
    # The list this page was opened from (its user, search, category and page): the way
    # back leads there, and on vadmin's view of one user's list the actions act on that
    # user's copies, as they do in the list.
    params = ListFilterForm(request.GET).values()
    owner = _get_list_owner(request, params["user"])
    list_query = _list_query(request, params)
    try:
        raw = get_store(message.origin).load(message.storage_key).message
    except StoreError:
        raw = None
    recipients = Recipient.objects.filter(message=message).visible_to(request.user)
    recipients = list(recipients.select_related("released_by").order_by("address"))
    acted_on = recipients
    if owner is not None:
        owned = set(Address.objects.for_user(owner).values_list("address", flat=True))
        acted_on = [r for r in recipients if r.address in owned]
    here = reverse("quarantine:detail", args=[message.mail_id])
    return render(request, "quarantine/detail.html", {
        "message": message,
        "summary": summarize(message),
        "rendered": render_message(raw) if raw is not None else None,
        "recipients": recipients,
        "owner": owner,
        "back": _with_query(reverse("quarantine:list"), list_query),
        "here": _with_query(here, list_query),
        "can_download": message.category in settings.ALLOWED_DOWNLOAD_TYPES,
        "can_release": _can_release(request, message.category)
        and any(r.released_at is None for r in acted_on),
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
    result = release_message(message, user=request.user, owner=_acting_owner(request))
    (messages.success if result.ok else messages.error)(request, result.text)
    return _back(request)


@login_required
@require_POST
def delete(request: HttpRequest, mail_id: str) -> HttpResponse:
    message = _get_message_for_user(request, mail_id)
    owner = _acting_owner(request)
    if owner is None:
        delete_message(message, user=request.user)
        if request.user.is_superuser:
            messages.success(request, "Message deleted for every recipient.")
        else:
            messages.success(request, "Message deleted.")
        return _back(request)
    addresses, gone = delete_copies(message, owner, user=request.user)
    if addresses:
        copies = "copy" if len(addresses) == 1 else "copies"
        rest = "no recipient is left" if gone else "the other recipients keep theirs"
        messages.success(
            request, f"Deleted {owner.username}'s {copies} ({', '.join(addresses)}); {rest}."
        )
    else:
        messages.error(request, f"Nothing deleted: {owner.username} has no copy of this message.")
    return _back(request)


def _held_for(owner: User, up_to: int | None = None) -> tuple[int, int | None]:
    """What "Delete all" deletes for `owner`: the number of messages (one per message,
    however many of the owner's addresses it was sent to) and the last recipient id among
    them; with `up_to`, only recipients up to that id count."""
    owned = Address.objects.for_user(owner).values("address")
    recipients = Recipient.objects.filter(address__in=owned)
    if up_to is not None:
        recipients = recipients.filter(id__lte=up_to)
    count = recipients.values("message_id").distinct().count()
    return count, recipients.aggregate(last=Max("id"))["last"]


@login_required
@require_http_methods(["GET", "POST"])
def delete_all(request: HttpRequest) -> HttpResponse:
    """ "Delete all" of a user's quarantine (vadmin: of the user named by `user`).

    A GET shows how many messages it deletes and a form to confirm; only that form's POST
    deletes. The form carries the number shown: when mail arrived (or went) meanwhile, the
    page is shown again with the new number instead of deleting what the user never saw
    counted."""
    data = request.POST if request.method == "POST" else request.GET
    params = ListFilterForm(data).values()
    owner = _get_list_owner(request, params["user"]) or request.user
    for_other = owner != request.user
    list_url = reverse("quarantine:list")
    if for_other:
        list_url += f"?user={owner.id}"
    count, up_to = _held_for(owner)
    changed = False
    if request.method == "POST":
        if request.POST.get("confirm") != "yes":
            url = reverse("quarantine:delete-all")
            return redirect(f"{url}?user={owner.id}" if for_other else url)
        shown_up_to = request.POST.get("up_to", "")
        if shown_up_to.isascii() and shown_up_to.isdigit():
            # What the page counted: mail that came after it is not deleted unseen.
            count, up_to = _held_for(owner, int(shown_up_to))
        if up_to is not None and request.POST.get("count") == str(count):
            count = delete_for_addresses(
                Address.objects.for_user(owner).values_list("address", flat=True),
                user=request.user,
                up_to=up_to,
            )
            plural = "message" if count == 1 else "messages"
            if for_other:
                copies = "copy" if count == 1 else "copies"
                messages.success(
                    request, f"Deleted {owner.username}'s {copies} of {count} {plural}."
                )
            else:
                messages.success(request, f"{count} {plural} deleted.")
            return redirect(list_url)
        changed = True
    return render(request, "quarantine/delete_all.html", {
        "owner": owner if for_other else None,
        "count": count,
        "up_to": up_to,
        "changed": changed,
        "list_url": list_url,
    })
