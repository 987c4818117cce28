"""Log-in throttling: a limit on attempts per account name and per client address.

An attempt is written down (a LoginFailure row) before the password is checked and
deleted again when it succeeds, so it counts as failed while it runs and stays failed if
the worker dies half-way. The counts live in the database, which every gunicorn worker and
every web host shares.

An attempt is refused, before any backend is asked (no LDAP bind at all), when the
account name already has LOGIN_FAILURE_LIMIT attempts within the last
LOGIN_LOCKOUT_MINUTES, or the client address has LOGIN_IP_FAILURE_LIMIT. The account limit
keeps guessing below Active Directory's lockout threshold, so that an attacker cannot lock
the person out of Windows through us; the address limit slows one client trying many
names. A success clears the account's attempts. Rows older than the window are pruned on
every attempt.

Attempts that run at the same time each write their row first and then count every other
row, so that concurrent requests cannot all slip under a limit: the last one to write sees
all the others (right at the limit two may refuse each other, which is the safe side).
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.http import HttpRequest
from django.utils import timezone

from directory.models import LoginFailure


@dataclass(frozen=True)
class Attempt:
    """A log-in attempt let through (`retry_minutes` None) or refused."""

    account: str
    row_id: int | None = None
    retry_minutes: int | None = None

    @property
    def refused(self) -> bool:
        return self.retry_minutes is not None


def account_key(username: str) -> str:
    """The key attempts at one account are counted under: the typed name in NFKC form (as
    the login form normalises it before authenticating, so `ａlice` is `alice`), trimmed,
    case-folded and without a `DOMAIN\\` prefix that names our domain, hashed."""
    from directory.auth import account_name

    name = account_name(unicodedata.normalize("NFKC", username).strip()).strip().casefold()
    return hashlib.sha256(name.encode("utf-8", errors="surrogatepass")).hexdigest()


def client_ip(request: HttpRequest) -> str | None:
    """The client's address: REMOTE_ADDR, or with BEHIND_PROXY the last address of
    X-Forwarded-For (the one our own proxy appended; earlier ones the client can forge)."""
    candidates = [request.META.get("REMOTE_ADDR", "")]
    if settings.BEHIND_PROXY:
        forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "").split(",")
        candidates.insert(0, forwarded[-1].strip())
    for candidate in candidates:
        try:
            return str(ipaddress.ip_address(candidate))
        except ValueError:
            continue
    return None


def start_attempt(username: str, ip: str | None, *, now: datetime | None = None) -> Attempt:
    """Record an attempt at `username` from `ip`, or refuse it when a limit is reached.

    A refused attempt leaves no row: waiting out the window is enough to try again.
    """
    now = now or timezone.now()
    account = account_key(username)
    since = now - timedelta(minutes=settings.LOGIN_LOCKOUT_MINUTES)
    LoginFailure.objects.filter(at__lt=since).delete()
    # A look before writing keeps an ongoing attack from writing a row per request.
    retry = _retry_minutes(account, ip, since=since, now=now)
    if retry is not None:
        return Attempt(account=account, retry_minutes=retry)
    row = LoginFailure.objects.create(account=account, ip=ip, at=now)
    retry = _retry_minutes(account, ip, since=since, now=now, other_than=row.id)
    if retry is not None:
        row.delete()
        return Attempt(account=account, retry_minutes=retry)
    return Attempt(account=account, row_id=row.id)


def attempt_succeeded(attempt: Attempt, *, username: str) -> None:
    """Clear the attempts at the typed name and at the name the user logged in as (an
    alias and the primary address are the same person)."""
    LoginFailure.objects.filter(account__in={attempt.account, account_key(username)}).delete()


def _retry_minutes(account: str, ip: str | None, *, since: datetime, now: datetime,
                   other_than: int | None = None) -> int | None:
    """Minutes until the account and the address are both under their limits again, or
    None when they are under them now."""
    limits = [(LoginFailure.objects.filter(account=account), settings.LOGIN_FAILURE_LIMIT)]
    if ip is not None:
        limits.append((LoginFailure.objects.filter(ip=ip), settings.LOGIN_IP_FAILURE_LIMIT))
    until: datetime | None = None
    for rows, limit in limits:
        rows = rows.filter(at__gte=since)
        if other_than is not None:
            rows = rows.exclude(id=other_than)
        # With `limit` attempts or more in the window, the limit-th newest one leaving it
        # is what brings the count under the limit.
        edge = rows.order_by("-at", "-id").values_list("at", flat=True)[limit - 1:limit]
        for at in edge:
            free_at = at + timedelta(minutes=settings.LOGIN_LOCKOUT_MINUTES)
            until = free_at if until is None else max(until, free_at)
    if until is None:
        return None
    return max(1, math.ceil((until - now).total_seconds() / 60))
