"""Viewer accounts: a user and the set of e-mail addresses whose quarantined mail they see.

The rule the appliance states: each address belongs to at most one user, a user may have
many. Everything that changes accounts (the console, the directory sync) goes through the
functions here so that the rule is checked in one place, inside one transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.db import IntegrityError, transaction
from django.db.models import IntegerField, OuterRef, QuerySet, Subquery

from directory.models import Address, normalize_address
from quarantine.models import Recipient

log = logging.getLogger(__name__)

# The longest address SMTP allows (RFC 5321 path limits), and the column's width.
MAX_ADDRESS_LENGTH = 320


class AddressConflict(Exception):
    """An address that is already another user's: ownership never moves silently."""

    def __init__(self, address: str, owner: str) -> None:
        super().__init__(f"{address} belongs to {owner}")
        self.address = address
        self.owner = owner


class UsernameTaken(Exception):
    def __init__(self, username: str) -> None:
        super().__init__(f"a user named {username} already exists")
        self.username = username


class ProtectedUser(Exception):
    """The superuser cannot be deleted: it is the only way into the console."""


@dataclass(frozen=True)
class AddressChange:
    """What `set_addresses` did, in the normalised form, sorted."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed)


def clean_addresses(values: Iterable[str]) -> list[str]:
    """Normalise, drop blanks, collapse duplicates (first one wins) and validate.

    Raises ValidationError naming every invalid value, so that a form can show them all.
    """
    seen: dict[str, None] = {}
    invalid: list[str] = []
    for value in values:
        address = normalize_address(value)
        if not address:
            continue
        try:
            if len(address) > MAX_ADDRESS_LENGTH:
                raise ValidationError("too long")
            validate_email(address)
        except ValidationError:
            invalid.append(value.strip())
            continue
        seen.setdefault(address, None)
    if invalid:
        raise ValidationError(
            [
                ValidationError("%(value)s is not a valid e-mail address.",
                                code="invalid", params={"value": value})
                for value in invalid
            ]
        )
    return list(seen)


def find_conflicts(addresses: Iterable[str], *, user: User | None = None) -> list[AddressConflict]:
    """The addresses among `addresses` (already normalised) owned by someone else."""
    others = Address.objects.filter(address__in=list(addresses)).select_related("user")
    if user is not None:
        others = others.exclude(user=user)
    return [AddressConflict(a.address, a.user.get_username()) for a in others.order_by("address")]


def set_addresses(
    user: User, addresses: Iterable[str], *, source: str = Address.SOURCE_LOCAL
) -> AddressChange:
    """Make the user's addresses of `source` exactly `addresses`.

    Addresses of the other source are left alone (the console edits local ones, the
    directory sync ldap ones); one listed here that the user already owns under the
    other source is kept as it is. An address owned by another user raises
    AddressConflict and nothing changes.
    """
    wanted = clean_addresses(addresses)
    with transaction.atomic():
        # Lock the user's rows so that two concurrent edits of the same user serialise
        # instead of computing their differences from the same stale set.
        current = {
            a.address: a.source
            for a in Address.objects.select_for_update().filter(user=user)
        }
        conflicts = find_conflicts(wanted, user=user)
        if conflicts:
            raise conflicts[0]
        added = [a for a in wanted if a not in current]
        removed = sorted(a for a, s in current.items() if s == source and a not in wanted)
        kept = sorted(a for a in wanted if a in current)
        Address.objects.filter(user=user, address__in=removed).delete()
        for address in added:
            try:
                # A savepoint per row: the unique index is the final word when another
                # request claims the same address between our check and this insert.
                with transaction.atomic():
                    Address.objects.create(user=user, address=address, source=source)
            except IntegrityError:
                owner = Address.objects.filter(address=address).values_list(
                    "user__username", flat=True
                ).first()
                raise AddressConflict(address, owner or "another user") from None
    change = AddressChange(added=sorted(added), removed=removed, kept=kept)
    if change.changed:
        log.info("addresses of %s: added %s, removed %s", user.get_username(),
                 change.added, change.removed)
    return change


def create_local_user(username: str, password: str, addresses: Iterable[str]) -> User:
    """A user who logs in with a password kept here, with their addresses, all or nothing.

    The password is expected to have passed the configured validators already (the form
    does that, with the user's attributes at hand)."""
    with transaction.atomic():
        if User.objects.filter(username__iexact=username).exists():
            raise UsernameTaken(username)
        try:
            with transaction.atomic():
                user = User.objects.create_user(username=username, password=password)
        except IntegrityError:
            raise UsernameTaken(username) from None
        set_addresses(user, addresses, source=Address.SOURCE_LOCAL)
    log.info("user %s created", username)
    return user


def update_user(user: User, *, addresses: Iterable[str], password: str = "") -> AddressChange:
    """The console's edit: replace the local addresses and, if given, set a new password,
    both or neither."""
    with transaction.atomic():
        change = set_addresses(user, addresses, source=Address.SOURCE_LOCAL)
        if password:
            set_local_password(user, password)
    return change


def set_local_password(user: User, password: str) -> None:
    if not has_local_password(user):
        raise ValueError(f"{user.get_username()} does not log in with a local password")
    user.set_password(password)
    user.save(update_fields=["password"])
    log.info("password of %s changed", user.get_username())


def delete_user(user: User) -> None:
    """Remove the account and its addresses; the quarantined mail stays (vadmin sees it,
    retention removes it)."""
    if user.is_superuser:
        raise ProtectedUser(f"{user.get_username()} is the administrator")
    username = user.get_username()
    with transaction.atomic():
        # Addresses go with the user (on_delete=CASCADE); Recipient rows keep the plain
        # address string and are not tied to the user at all.
        user.delete()
    log.info("user %s deleted", username)


def has_local_password(user: User) -> bool:
    """Whether the user logs in with a password kept here, not through the directory."""
    return user.has_usable_password() and not user.addresses.filter(
        source=Address.SOURCE_LDAP
    ).exists()


class _CountOf(Subquery):
    """COUNT(*) of a correlated subquery: one query for the whole list, no GROUP BY."""

    template = "(SELECT COUNT(*) FROM (%(subquery)s) _count)"
    output_field = IntegerField()


def users_with_counts() -> QuerySet[User]:
    """Users with `address_count` and `message_count` (quarantine rows for their addresses)."""
    addresses = Address.objects.filter(user=OuterRef("pk")).values("address")
    messages = Recipient.objects.filter(
        address__in=Address.objects.filter(user=OuterRef(OuterRef("pk"))).values("address")
    ).values("id")
    return (
        User.objects.annotate(
            address_count=_CountOf(addresses),
            message_count=_CountOf(messages),
        )
        .order_by("username")
    )


__all__ = [
    "AddressChange",
    "AddressConflict",
    "ProtectedUser",
    "UsernameTaken",
    "clean_addresses",
    "create_local_user",
    "delete_user",
    "find_conflicts",
    "has_local_password",
    "set_addresses",
    "set_local_password",
    "update_user",
    "users_with_counts",
]
