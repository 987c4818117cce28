from __future__ import annotations

from django.conf import settings
from django.db import models


class AddressQuerySet(models.QuerySet["Address"]):
    def for_user(self, user) -> AddressQuerySet:
        return self.filter(user=user)


class Address(models.Model):
    """An e-mail address and the one viewer user who owns its quarantined mail."""

    SOURCE_LOCAL = "local"
    SOURCE_LDAP = "ldap"
    SOURCE_CHOICES = [(SOURCE_LOCAL, "local"), (SOURCE_LDAP, "directory")]

    address = models.CharField(max_length=320, unique=True)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="addresses"
    )
    source = models.CharField(max_length=8, choices=SOURCE_CHOICES, default=SOURCE_LOCAL)

    objects = AddressQuerySet.as_manager()

    class Meta:
        ordering = ["address"]

    def __str__(self) -> str:
        return self.address

    def save(self, *args, **kwargs) -> None:
        self.address = normalize_address(self.address)
        super().save(*args, **kwargs)


def normalize_address(address: str) -> str:
    """The form addresses are compared in: trimmed, without <>, lower-cased."""
    return address.strip().strip("<>").strip().lower()


class DirectoryIdentity(models.Model):
    """Which directory object a synced user is. `guid` (objectGUID, hex) never changes; the
    DN changes when the object is moved or renamed, so it is only the fallback key for
    directories without objectGUID."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="directory_identity"
    )
    guid = models.CharField(max_length=64, unique=True, null=True, blank=True)
    dn = models.TextField()
    synced_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return self.dn


class LoginFailure(models.Model):
    """One log-in attempt that has not succeeded, kept for LOGIN_LOCKOUT_MINUTES.

    The row is written before the password is checked and deleted when the attempt
    succeeds, so an attempt that is still running already counts: workers and hosts that
    share the database see the same counts. `account` is a hash of the typed name (see
    directory/throttle.py), which keeps passwords typed into the name field out of the
    table.
    """

    account = models.CharField(max_length=64)
    ip = models.GenericIPAddressField(null=True, blank=True)
    at = models.DateTimeField()

    class Meta:
        indexes = [
            models.Index(fields=["account", "at"], name="loginfailure_account_at"),
            models.Index(fields=["ip", "at"], name="loginfailure_ip_at"),
            models.Index(fields=["at"], name="loginfailure_at"),
        ]

    def __str__(self) -> str:
        return f"{self.account[:12]} from {self.ip} at {self.at:%Y-%m-%d %H:%M:%S}"
