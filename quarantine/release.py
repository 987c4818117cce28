"""Releasing a quarantined message: deliver the original to the user's own recipients.

The message goes by SMTP to the reinjection port (RELEASE_SMTP_HOST:RELEASE_SMTP_PORT), as
amavisd-new's release does, so released mail is not filtered again. What is sent is the
original message exactly as stored (the quarantine header block removed), line ends made
CRLF, and nothing added: no header of ours can be forged or broken by the mail's content.

Two releases of the same copy deliver once: a recipient row is first *claimed* by one
conditional UPDATE, which only one transaction can win; only claimed rows are sent, and
the claim becomes `released_at` on success or is cleared on failure. A claim older than
CLAIM_TIMEOUT (a worker that died mid-release) may be taken again.
"""

from __future__ import annotations

import re
import smtplib
from dataclasses import dataclass, field
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from directory.models import Address
from quarantine.headers import make_visible
from quarantine.models import AuditEvent, Category, Message, Recipient, record_event
from quarantine.store import StoreError, get_store, to_crlf

CLAIM_TIMEOUT = timedelta(minutes=10)

# An envelope address as it may go into MAIL FROM / RCPT TO: anything that could end the
# command, add a parameter or close the brackets is refused (CR, LF, NUL, space, <, >).
_ADDRESS_RE = re.compile(r"^[^\s<>\x00]{1,320}$")


@dataclass
class ReleaseResult:
    ok: bool
    text: str
    delivered: list[str] = field(default_factory=list)


class _Refused(Exception):
    """The release cannot be attempted; the text says why."""


def release_message(message: Message, *, user, owner=None) -> ReleaseResult:
    """Deliver `message` to the recipients that `user` owns (vadmin: all of them); with
    `owner` (vadmin acting on one user's list), to those of them that are `owner`'s.

    Recipients already released, or being released by someone else right now, are left
    alone. On refusal or failure nothing changes and the result carries the reason."""
    if (
        message.category == Category.VIRUS
        and not user.is_superuser
        and not settings.RELEASE_VIRUS_BY_USERS
    ):
        return _failed(message, user, "Release refused: messages with a virus can only be "
                                      "released by the administrator.")
    claimed = _claim(message, user=user, owner=owner)
    if not claimed:
        if owner is not None and not _copies(message, owner).exists():
            return ReleaseResult(
                ok=False,
                text=f"Nothing to release: {owner.username} has no copy of this message.",
            )
        whose = f" for {owner.username}" if owner is not None else ""
        return ReleaseResult(
            ok=False,
            text=f"Nothing to release{whose}: already released, or a release is running.",
        )
    try:
        sender, recipients, data = _prepare(message, claimed)
        refused = _send(sender, recipients, data)
    except _Refused as exc:
        _unclaim(claimed)
        return _failed(message, user, str(exc))
    delivered = [r for r in claimed if r.address not in refused]
    now = timezone.now()
    Recipient.objects.filter(id__in=[r.id for r in delivered]).update(
        released_at=now, released_by=user, release_claimed_at=None
    )
    _unclaim([r for r in claimed if r.address in refused])
    addresses = ", ".join(r.address for r in delivered)
    record_event(user, AuditEvent.Action.RELEASE, mail_id=message.mail_id, detail=addresses)
    if owner is not None:
        copies = "copy" if len(delivered) == 1 else "copies"
        text = f"Released {owner.username}'s {copies} to {addresses}."
    else:
        text = f"Released to {addresses}."
    if refused:
        text += " Refused: " + "; ".join(
            f"{addr}: {answer}" for addr, answer in sorted(refused.items())
        )
        record_event(
            user, AuditEvent.Action.RELEASE_FAILED, mail_id=message.mail_id, detail=text
        )
    return ReleaseResult(ok=True, text=text, delivered=[r.address for r in delivered])


def _copies(message: Message, owner):
    """The recipients of `message` that are addresses of `owner`."""
    owned = Address.objects.for_user(owner).values("address")
    return Recipient.objects.filter(message=message, address__in=owned)


def _claim(message: Message, *, user, owner=None) -> list[Recipient]:
    candidates = Recipient.objects.filter(message=message, released_at__isnull=True)
    if owner is not None:
        candidates = candidates.filter(id__in=_copies(message, owner).values("id"))
    candidates = list(candidates.visible_to(user).order_by("id"))
    now = timezone.now()
    claimable = Q(release_claimed_at__isnull=True) | Q(release_claimed_at__lt=now - CLAIM_TIMEOUT)
    claimed = []
    for recipient in candidates:
        # One statement per row: on PostgreSQL a concurrent UPDATE of the same row waits
        # for this one and then re-checks the WHERE clause, so exactly one of them counts 1.
        with transaction.atomic():
            won = (
                Recipient.objects.filter(id=recipient.id, released_at__isnull=True)
                .filter(claimable)
                .update(release_claimed_at=now)
            )
        if won:
            claimed.append(recipient)
    return claimed


def _unclaim(recipients: list[Recipient]) -> None:
    if recipients:
        Recipient.objects.filter(id__in=[r.id for r in recipients]).update(
            release_claimed_at=None
        )


def _prepare(message: Message, claimed: list[Recipient]) -> tuple[str, list[str], bytes]:
    try:
        stored = get_store(message.origin).load(message.storage_key)
    except StoreError as exc:
        raise _Refused("Release failed: the stored message cannot be read.") from exc
    # amavisd-new refuses a file whose quarantine id is not the one asked for; so do we,
    # so that a row can never make us send another message's file.
    if stored.mail_id is not None and stored.mail_id != message.mail_id:
        raise _Refused("Release refused: the stored file belongs to another message.")
    has_sender = stored.first("X-Envelope-From") is not None or stored.first("Return-Path")
    sender = stored.sender if has_sender else message.envelope_sender
    # The null sender (bounces) is valid and stays null.
    if sender and not _ADDRESS_RE.match(sender):
        raise _Refused(
            f"Release refused: the envelope sender {make_visible(sender)[:200]} is not valid."
        )
    recipients = [r.address for r in claimed]
    for address in recipients:
        if not _ADDRESS_RE.match(address):
            raise _Refused(
                f"Release refused: the recipient {make_visible(address)[:200]} is not valid."
            )
    return sender, recipients, to_crlf(stored.message)


def _send(sender: str, recipients: list[str], data: bytes) -> dict[str, str]:
    """Send one SMTP transaction; the recipients the server refused, with its answer."""
    host, port = settings.RELEASE_SMTP_HOST, settings.RELEASE_SMTP_PORT
    options = ["SMTPUTF8"] if not (sender + "".join(recipients)).isascii() else []
    try:
        smtp = smtplib.SMTP(host, port, timeout=settings.RELEASE_SMTP_TIMEOUT)
        try:
            # smtplib dot-stuffs the data; it only sees LF-terminated lines, hence to_crlf.
            refused = smtp.sendmail(sender, recipients, data, mail_options=options)
        finally:
            # The message is the next hop's once sendmail returned: what QUIT gets
            # changes nothing.
            try:
                smtp.quit()
            except (smtplib.SMTPException, OSError):
                smtp.close()
    except smtplib.SMTPRecipientsRefused as exc:
        answers = {_answer(code, text) for code, text in exc.recipients.values()}
        raise _Refused("Release failed: " + "; ".join(sorted(answers))) from exc
    except smtplib.SMTPResponseException as exc:
        raise _Refused("Release failed: " + _answer(exc.smtp_code, exc.smtp_error)) from exc
    except smtplib.SMTPNotSupportedError as exc:
        raise _Refused(f"Release failed: {host}:{port} does not accept SMTPUTF8.") from exc
    except smtplib.SMTPServerDisconnected as exc:
        raise _Refused(f"Release failed: {host}:{port} closed the connection.") from exc
    except (smtplib.SMTPException, OSError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise _Refused(
            f"Release failed: cannot connect to {host}:{port} ({make_visible(reason)})"
        ) from exc
    return {addr: _answer(code, text) for addr, (code, text) in refused.items()}


def _answer(code: int, text: bytes | str) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return make_visible(f"{code} {text}".strip())[:500]


def _failed(message: Message, user, text: str) -> ReleaseResult:
    record_event(user, AuditEvent.Action.RELEASE_FAILED, mail_id=message.mail_id, detail=text)
    return ReleaseResult(ok=False, text=text)
