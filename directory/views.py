"""The administration console: vadmin's pages for accounts, the quarantine and the audit log."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from pathlib import Path

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import update_session_auth_hash
from django.contrib.auth.forms import PasswordChangeForm
from django.contrib.auth.models import User
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_http_methods, require_POST

from directory import accounts
from directory.forms import AddUserForm, AuditFilterForm, ClearQuarantineForm, EditUserForm
from directory.models import Address
from directory.relaymap import RelayMapError, write_relay_map
from quarantine.deletion import clear_quarantine
from quarantine.models import AuditEvent

AUDIT_PAGE_SIZE = 100


def vadmin_required(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """Anonymous visitors go to the login page; anybody logged in but not the superuser gets
    403. (Django's user_passes_test would send a logged-in user round the login page again,
    which hides the refusal and invites a retry with another account.)"""

    @wraps(view)
    def wrapped(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        if not request.user.is_authenticated:
            return redirect_to_login(request.get_full_path())
        if not request.user.is_superuser:
            raise PermissionDenied
        return view(request, *args, **kwargs)

    return wrapped


def _get_user(user_id: int) -> User:
    return get_object_or_404(User, pk=user_id)


def _local_accounts_only() -> None:
    # With LDAP logins the directory is where accounts come from; the sync creates them.
    if settings.LOGIN_METHOD != "local":
        raise Http404("users come from the directory")


def _console(request: HttpRequest, clear_form: ClearQuarantineForm, status: int = 200):
    return render(
        request,
        "directory/console.html",
        {"clear_form": clear_form, "can_add_users": settings.LOGIN_METHOD == "local"},
        status=status,
    )


@vadmin_required
@require_http_methods(["GET", "HEAD"])
def console(request: HttpRequest) -> HttpResponse:
    return _console(request, ClearQuarantineForm())


@vadmin_required
@require_POST
def clear(request: HttpRequest) -> HttpResponse:
    form = ClearQuarantineForm(request.POST)
    if not form.is_valid():
        return _console(request, form, status=400)
    removed = clear_quarantine(user=request.user)
    messages.success(request, f"The quarantine is empty: {removed} messages deleted.")
    return redirect("directory:console")


@vadmin_required
@require_http_methods(["GET", "HEAD"])
def user_list(request: HttpRequest) -> HttpResponse:
    return render(request, "directory/users.html", {"users": accounts.users_with_counts()})


@vadmin_required
@require_http_methods(["GET", "HEAD", "POST"])
def user_add(request: HttpRequest) -> HttpResponse:
    _local_accounts_only()
    form = AddUserForm(request.POST or None)
    if form.is_valid():
        try:
            user = accounts.create_local_user(
                form.cleaned_data["username"],
                form.cleaned_data["password1"],
                form.cleaned_data["addresses"],
            )
        except (accounts.AddressConflict, accounts.UsernameTaken) as exc:
            # Someone else got there between validation and the insert.
            form.add_error(None, str(exc))
        else:
            messages.success(request, f"User {user.username} added.")
            _refresh_relay_map(request)
            return redirect("directory:users")
    return render(request, "directory/user_form.html", {"form": form, "adding": True})


@vadmin_required
@require_http_methods(["GET", "HEAD", "POST"])
def user_edit(request: HttpRequest, user_id: int) -> HttpResponse:
    user = _get_user(user_id)
    # Your own password is changed on its own page, which asks for the current one.
    with_password = accounts.has_local_password(user) and user != request.user
    form = EditUserForm(
        user,
        request.POST or None,
        with_password=with_password,
        initial={"addresses": list(user.addresses.filter(source=Address.SOURCE_LOCAL)
                                   .values_list("address", flat=True))},
    )
    if form.is_valid():
        try:
            change = accounts.update_user(
                user, addresses=form.cleaned_data["addresses"], password=form.new_password
            )
        except accounts.AddressConflict as exc:
            form.add_error("addresses", str(exc))
        else:
            messages.success(request, _edit_summary(user, change, bool(form.new_password)))
            if change.changed:
                _refresh_relay_map(request)
            return redirect("directory:users")
    context = {
        "form": form,
        "edited": user,
        "directory_addresses": user.addresses.filter(source=Address.SOURCE_LDAP),
    }
    return render(request, "directory/user_form.html", context)


def _refresh_relay_map(request: HttpRequest) -> None:
    """Postfix takes mail only for the addresses in the relay map. Once the map exists
    (`writerelaymap` or the directory sync wrote it), each change of addresses here
    rewrites it, so that a new user's mail is not refused until the next sync. A map
    that cannot be rewritten stays as it was, and vadmin is told why."""
    if not Path(settings.RELAY_MAP_PATH).exists():
        return
    try:
        write_relay_map()
    except RelayMapError as exc:
        messages.warning(
            request,
            f"The relay map was not rewritten, Postfix still uses the previous one: {exc}. "
            "Run manage.py writerelaymap once the cause is fixed.",
        )


def _edit_summary(user: User, change: accounts.AddressChange, password: bool) -> str:
    parts = []
    if change.added:
        parts.append(f"added {', '.join(change.added)}")
    if change.removed:
        parts.append(f"removed {', '.join(change.removed)}")
    if password:
        parts.append("password changed")
    return f"User {user.username}: {'; '.join(parts) or 'no change'}."


@vadmin_required
@require_http_methods(["GET", "HEAD", "POST"])
def user_delete(request: HttpRequest, user_id: int) -> HttpResponse:
    user = _get_user(user_id)
    if request.method == "POST":
        had_addresses = user.addresses.exists()
        try:
            accounts.delete_user(user)
        except accounts.ProtectedUser:
            raise PermissionDenied from None
        messages.success(request, f"User {user.username} deleted; their quarantined mail stays.")
        if had_addresses:
            _refresh_relay_map(request)
        return redirect("directory:users")
    return render(
        request, "directory/user_delete.html", {"edited": user, "addresses": user.addresses.all()}
    )


@vadmin_required
@require_http_methods(["GET", "HEAD", "POST"])
def password(request: HttpRequest) -> HttpResponse:
    form = PasswordChangeForm(request.user, request.POST or None)
    if form.is_valid():
        user = form.save()
        # Changing the password rotates the session hash; keep this session logged in
        # (other sessions of vadmin are logged out, which is the point).
        update_session_auth_hash(request, user)
        messages.success(request, "Your password has been changed.")
        return redirect("directory:console")
    return render(request, "directory/password.html", {"form": form})


@vadmin_required
@require_http_methods(["GET", "HEAD"])
def audit(request: HttpRequest) -> HttpResponse:
    form = AuditFilterForm(request.GET)
    action, before = "", None
    if form.is_valid():
        action, before = form.cleaned_data["action"], form.cleaned_data["before"]
    events, older = _audit_page(action=action, before=before)
    context = {"form": form, "events": events, "older": older, "action": action,
               "first_page": before is None}
    return render(request, "directory/audit.html", context)


def _audit_page(*, action: str, before: int | None) -> tuple[list[AuditEvent], int | None]:
    """One page, newest first, by id cursor: ids grow with time and the primary key index
    serves the range, so no page ever counts the table. Returns the events and the cursor
    of the next (older) page, or None at the end."""
    events = AuditEvent.objects.order_by("-id")
    if action:
        events = events.filter(action=action)
    if before is not None:
        events = events.filter(id__lt=before)
    page = list(events[: AUDIT_PAGE_SIZE + 1])
    if len(page) > AUDIT_PAGE_SIZE:
        page = page[:AUDIT_PAGE_SIZE]
        return page, page[-1].id
    return page, None
