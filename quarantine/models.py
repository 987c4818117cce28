from __future__ import annotations

from django.conf import settings
from django.db import models


class Category(models.TextChoices):
    VIRUS = "VIRUS", "Virus"
    BANNED = "BANNED", "Banned attachment"
    SPAM = "SPAM", "Spam"
    BADH = "BADH", "Bad header"


class MessageQuerySet(models.QuerySet["Message"]):
    def visible_to(self, user) -> MessageQuerySet:
        """Messages with at least one envelope recipient among the user's addresses."""
        if user.is_superuser:
            return self
        return self.filter(recipients__address__in=_owned(user)).distinct()


class Message(models.Model):
    """One quarantined message: what the list and detail pages show, and where it is stored.

    `origin` is the root of the store the file lives in and `storage_key` its path below it;
    the file is only ever found through these two columns, never through a URL.
    """

    mail_id = models.CharField(max_length=32, unique=True)
    category = models.CharField(max_length=8, choices=Category.choices)
    envelope_sender = models.CharField(max_length=320, blank=True)
    from_header = models.CharField(max_length=1000, blank=True)
    to_header = models.CharField(max_length=2000, blank=True)
    subject = models.CharField(max_length=1000, blank=True)
    date = models.DateTimeField(null=True, blank=True)
    received_at = models.DateTimeField(db_index=True)
    size = models.PositiveBigIntegerField(default=0)
    spam_score = models.FloatField(null=True, blank=True)
    reasons = models.TextField(blank=True)
    origin = models.CharField(max_length=500)
    storage_key = models.CharField(max_length=300)
    file_size = models.PositiveBigIntegerField(default=0)
    file_mtime_ns = models.BigIntegerField(default=0)

    objects = MessageQuerySet.as_manager()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["origin", "storage_key"], name="message_store_file")
        ]
        # In PostgreSQL, migration 0002 adds GIN trigram indexes for the list's search on
        # UPPER(subject), UPPER(from_header), UPPER(to_header) and the recipient's
        # UPPER(address); they are not declared here because SQLite has no equivalent.
        indexes = [models.Index(fields=["-received_at", "-id"], name="message_newest")]

    def __str__(self) -> str:
        return f"{self.category} {self.mail_id}"


class PendingFileDeletion(models.Model):
    """A store file whose message rows are deleted but which may still be on disk.

    Recorded in the transaction that deletes the rows, and removed once the file is
    unlinked (or found gone). The indexer never indexes a file that has one, so a file
    whose removal was interrupted or failed is not brought back as a message;
    `prunequarantine` retries the removal.
    """

    origin = models.CharField(max_length=500)
    storage_key = models.CharField(max_length=300)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["origin", "storage_key"], name="pending_deletion_file"
            )
        ]

    def __str__(self) -> str:
        return f"{self.origin}/{self.storage_key}"


class RecipientQuerySet(models.QuerySet["Recipient"]):
    def visible_to(self, user) -> RecipientQuerySet:
        if user.is_superuser:
            return self
        return self.filter(address__in=_owned(user))

    def newest_first(self) -> RecipientQuerySet:
        return self.order_by("-received_at", "-id")


class Recipient(models.Model):
    """An envelope recipient of a quarantined message: the row the message list pages over.

    `received_at` and `category` repeat the message's so that a user's list is one range
    scan of the (address, received_at) index, whatever the size of the quarantine.
    """

    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="recipients")
    address = models.CharField(max_length=320)
    received_at = models.DateTimeField()
    category = models.CharField(max_length=8, choices=Category.choices)
    released_at = models.DateTimeField(null=True, blank=True)
    released_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
        related_name="+",
    )
    # A release in progress: set by the one request that won the claim, so that two
    # concurrent releases deliver once.
    release_claimed_at = models.DateTimeField(null=True, blank=True)

    objects = RecipientQuerySet.as_manager()

    class Meta:
        indexes = [
            models.Index(fields=["address", "-received_at", "-id"], name="rcpt_address_newest"),
            models.Index(fields=["-received_at", "-id"], name="rcpt_newest"),
        ]
        constraints = [
            models.UniqueConstraint(fields=["message", "address"], name="rcpt_once_per_message")
        ]

    def __str__(self) -> str:
        return f"{self.address} ({self.message.mail_id})"


class AuditEvent(models.Model):
    """Who released, downloaded, deleted or cleared what, and when."""

    class Action(models.TextChoices):
        RELEASE = "release", "release"
        RELEASE_FAILED = "release-failed", "release failed"
        DOWNLOAD = "download", "download"
        DELETE = "delete", "delete"
        CLEAR = "clear", "clear"
        PRUNE = "prune", "prune"

    at = models.DateTimeField(auto_now_add=True, db_index=True)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
        related_name="+",
    )
    username = models.CharField(max_length=150, blank=True)
    action = models.CharField(max_length=16, choices=Action.choices)
    mail_id = models.CharField(max_length=32, blank=True)
    detail = models.TextField(blank=True)

    class Meta:
        ordering = ["-at", "-id"]

    def __str__(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M} {self.username} {self.action} {self.mail_id}"


def record_event(user, action: str, *, mail_id: str = "", detail: str = "") -> AuditEvent:
    return AuditEvent.objects.create(
        user=user if user is not None and user.is_authenticated else None,
        username=getattr(user, "username", "") or "system",
        action=action,
        mail_id=mail_id,
        detail=detail[:4000],
    )


def _owned(user):
    from directory.models import Address

    return Address.objects.filter(user=user).values("address")


__all__ = [
    "AuditEvent", "Category", "Message", "PendingFileDeletion", "Recipient", "record_event",
]
