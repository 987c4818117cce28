"""Directory -> viewer users and addresses -> relay map.

What the sync reads under each base DN (LDAP_BASE_DN), with paging: people (LDAP_USER_FILTER),
groups, contacts and public folders, each only when mail-enabled (`proxyAddresses` or
`mail`). Addresses come from the `SMTP:`/`smtp:` values of `proxyAddresses` (the prefix is
compared without regard to case; its case only marks the primary address; X400, X500, SIP
and the other types are ignored) and from `mail`; everything is lower-cased and only
valid `local@domain` addresses are kept.

What it makes of them:
- each person becomes a viewer user named by their primary address, holding all their
  addresses (source "ldap"); the user keeps the object's identity (objectGUID, else the
  DN) so that a rename or a move updates the same user instead of making a second one;
- a disabled person (userAccountControl bit 2) cannot log in (is_active=False) and their
  addresses leave the relay map; a disabled account that is a shared, room or equipment
  mailbox (msExchRecipientTypeDetails 4, 16, 32) still receives mail, so its addresses stay;
- groups, contacts and public folders are not users: their addresses only go into the
  relay map (kept in the side file RELAY_MAP_DIRECTORY_EXTRA);
- an address claimed by two directory objects is reported and given to neither user; it
  stays in the relay map because the directory says it is deliverable;
- a person that cannot be given a viewer user (its primary address is the name of a local
  user, or too long for a user name) is reported; its addresses stay in the relay map
  (side file) all the same, since the mailbox receives mail;
- a directory user whose object is gone is taken over by a new object with the same
  primary address (an account deleted and created again): its identity follows the new
  object. Local users and vadmin are never taken over;
- users whose object is gone are disabled (default) or deleted (`clear`).

The default run adds and updates what comes from the directory and leaves local edits
alone: local users, and addresses a local edit gave to someone (reported as conflicts).
`clear` redraws everything that comes from the directory: directory users that are gone
are deleted, and an address the directory gives to a person is taken from whoever held
it locally. Local users themselves are kept.

Nothing changes when the directory cannot be read completely, when it returns no
mail-enabled object at all, when the relay map would shrink below RELAY_MAP_MIN_RATIO of
the current one (unless forced), or when the map cannot be written (postmap fails, another
writer holds its lock): the database changes are rolled back and the current map and side
file stay in place. The side file and the map are written inside the database transaction,
under the map's lock, which is held until the commit.

A log-in (user_for_login) may make the user of an object while the sync runs: the sync
then updates that user instead of making a second one.
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import ldap
from django.conf import settings
from django.contrib.auth.models import User
from django.db import IntegrityError, transaction

from directory import relaymap
from directory.ldap import (
    BaseDNNotFound,
    Connection,
    DirectoryConfig,
    DirectoryError,
    connect,
)
from directory.models import Address, DirectoryIdentity

log = logging.getLogger(__name__)

PERSON = "person"
GROUP = "group"
CONTACT = "contact"
PUBLIC_FOLDER = "public folder"

ATTRIBUTES = [
    "mail",
    "proxyAddresses",
    "userAccountControl",
    "msExchRecipientTypeDetails",
    "objectGUID",
    "userPrincipalName",
    "sAMAccountName",
]
MAIL_ENABLED = "(|(proxyAddresses=*)(mail=*))"
ACCOUNTDISABLE = 0x2
# msExchRecipientTypeDetails of mailboxes whose (disabled) account still receives mail.
SHARED_MAILBOX_TYPES = {4: "shared", 16: "room", 32: "equipment"}
MAX_USERNAME_LENGTH = 150

Progress = Callable[[str, int, int | None], None]


class DirectoryEmpty(DirectoryError):
    pass


class SyncBusy(Exception):
    pass


@dataclass
class DirectoryObject:
    kind: str
    dn: str
    guid: str | None
    primary: str | None
    addresses: list[str]
    disabled: bool = False
    mailbox_type: str | None = None

    @property
    def key(self) -> str:
        return self.guid or f"dn:{self.dn.lower()}"

    @property
    def receives_mail(self) -> bool:
        """Whether its addresses belong in the relay map."""
        return self.kind != PERSON or not self.disabled or self.mailbox_type is not None


@dataclass
class SyncSummary:
    entries: int = 0
    users_added: int = 0
    users_updated: int = 0
    users_disabled: int = 0
    users_deleted: int = 0
    addresses_added: int = 0
    addresses_moved: int = 0
    addresses_removed: int = 0
    map_only: int = 0
    conflicts: list[str] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)
    map_count: int | None = None
    dry_run: bool = False

    def __str__(self) -> str:
        text = (
            f"{self.entries} directory objects; users added {self.users_added}, "
            f"updated {self.users_updated}, disabled {self.users_disabled}, "
            f"deleted {self.users_deleted}; addresses added {self.addresses_added}, "
            f"moved {self.addresses_moved}, removed {self.addresses_removed}; "
            f"{len(self.conflicts)} conflicts; {len(self.invalid)} invalid values"
        )
        if self.map_count is not None:
            text += f"; relay map {self.map_count} addresses"
        if self.dry_run:
            text += " (dry run: nothing changed)"
        return text


def _text(values: Iterable[bytes]) -> list[str]:
    return [v.decode("utf-8", errors="replace") for v in values]


def _int(values: list[bytes] | None) -> int:
    try:
        return int(values[0]) if values else 0
    except ValueError:
        return 0


def entry_addresses(attrs: dict[str, list[bytes]]) -> tuple[str | None, list[str], list[str]]:
    """(primary address, all valid addresses primary first, rejected values) of an entry."""
    primary: str | None = None
    found: dict[str, None] = {}
    rejected: list[str] = []
    candidates: list[tuple[str, bool]] = []
    for value in _text(attrs.get("proxyAddresses", [])):
        prefix, sep, address = value.partition(":")
        if sep and prefix.lower() == "smtp":
            candidates.append((address, prefix == "SMTP"))
    for value in _text(attrs.get("mail", [])):
        candidates.append((value, False))
    for value, is_primary in candidates:
        key = relaymap.map_key(value)
        if key is None:
            rejected.append(value)
            continue
        if is_primary and primary is None:
            primary = key
        found.setdefault(key, None)
    mail = next((relaymap.map_key(v) for v in _text(attrs.get("mail", []))), None)
    primary = primary or mail or next(iter(found), None)
    addresses = list(found)
    if primary is not None:
        addresses.remove(primary)
        addresses.insert(0, primary)
    return primary, addresses, rejected


def _guid(attrs: dict[str, list[bytes]]) -> str | None:
    values = attrs.get("objectGUID")
    return values[0].hex() if values and values[0] else None


def directory_object(kind: str, dn: str, attrs: dict[str, list[bytes]]) -> DirectoryObject:
    primary, addresses, _ = entry_addresses(attrs)
    disabled = bool(_int(attrs.get("userAccountControl")) & ACCOUNTDISABLE)
    return DirectoryObject(
        kind=kind, dn=dn, guid=_guid(attrs), primary=primary, addresses=addresses,
        disabled=kind == PERSON and disabled,
        mailbox_type=SHARED_MAILBOX_TYPES.get(_int(attrs.get("msExchRecipientTypeDetails"))),
    )


def _filters() -> list[tuple[str, str]]:
    extra = settings.LDAP_EXTRA_FILTER or ""
    kinds = [
        (PERSON, settings.LDAP_USER_FILTER),
        (GROUP, settings.LDAP_GROUP_FILTER),
        (CONTACT, settings.LDAP_CONTACT_FILTER),
        (PUBLIC_FOLDER, settings.LDAP_PUBLIC_FOLDER_FILTER),
    ]
    return [(kind, f"(&{f}{MAIL_ENABLED}{extra})") for kind, f in kinds if f]


def read_directory(
    config: DirectoryConfig | None = None, *, progress: Progress | None = None,
    summary: SyncSummary | None = None,
) -> list[DirectoryObject]:
    """Every mail-enabled object under every base DN, read completely or not at all."""
    config = config or DirectoryConfig.from_settings()
    if not config.base_dns:
        raise DirectoryError(config.server, "no base DN is configured (LDAP_BASE_DN)")
    objects: dict[str, DirectoryObject] = {}
    with connect(config) as conn:
        for base in config.base_dns:
            for kind, filterstr in _filters():
                _read(conn, base, kind, filterstr, objects, progress, summary)
    return list(objects.values())


def _read(conn: Connection, base: str, kind: str, filterstr: str,
          objects: dict[str, DirectoryObject], progress: Progress | None,
          summary: SyncSummary | None) -> None:
    for dn, attrs in conn.paged_search(base, filterstr, ATTRIBUTES):
        # Base DNs may overlap, and an object may match two filters: first one wins.
        if dn.lower() in objects:
            continue
        obj = directory_object(kind, dn, attrs)
        objects[dn.lower()] = obj
        if summary is not None:
            summary.invalid.extend(entry_addresses(attrs)[2])
        if progress:
            progress("read", len(objects), None)


def sync_directory(
    *,
    clear: bool = False,
    dry_run: bool = False,
    force: bool = False,
    progress: Progress | None = None,
    config: DirectoryConfig | None = None,
) -> SyncSummary:
    """Bring users, addresses and the relay map in line with the directory.

    Raises DirectoryError (nothing changed) when the directory cannot be read or returns
    nothing, RelayMapShrinkRefused (nothing changed) when the map would shrink too much
    without `force`, SyncBusy when another sync is running.
    """
    lock = relaymap.exclusive_lock(settings.DIRECTORY_SYNC_LOCK, timeout=0,
                                   busy=SyncBusy("another directory sync is running"))
    with lock:
        summary = SyncSummary(dry_run=dry_run)
        objects = read_directory(config, progress=progress, summary=summary)
        summary.entries = len(objects)
        if not objects:
            cfg = config or DirectoryConfig.from_settings()
            raise DirectoryEmpty(cfg.server, "the directory returned no mail-enabled object "
                                 "under " + "; ".join(cfg.base_dns) + "; nothing changed")
        with contextlib.ExitStack() as map_locked:
            previous_extras: list[str] | None = None
            try:
                with transaction.atomic():
                    extras = _apply(objects, summary, clear=clear, progress=progress)
                    keys, _ = relaymap.collect_keys(directory_extra=extras)
                    summary.map_count = len(keys)
                    # Inside the transaction: a refusal rolls every change back.
                    relaymap.check_size(len(keys), force=force)
                    if dry_run:
                        transaction.set_rollback(True)
                    else:
                        # The side file and the map are written inside the transaction
                        # (a failure rolls the database back) and under the map's lock,
                        # which is held until the commit, so that no other writer
                        # rebuilds the map from a database the sync has not committed.
                        map_locked.enter_context(relaymap.map_lock())
                        before = relaymap.read_address_file(
                            settings.RELAY_MAP_DIRECTORY_EXTRA)
                        result = relaymap.write_relay_map_locked(
                            force=force, directory_extra=extras, replace_side_file=True)
                        previous_extras = before
                        summary.map_count = result.count
            except Exception:
                if previous_extras is not None:
                    _restore_map(previous_extras)
                raise
    for conflict in summary.conflicts:
        log.warning("directory sync: %s", conflict)
    log.info("directory sync: %s", summary)
    return summary


def _restore_map(extras: list[str]) -> None:
    """After a commit that failed once the map was replaced: the map and the side file of
    the database as it still is (the map's lock is held)."""
    try:
        relaymap.write_relay_map_locked(force=True, directory_extra=extras,
                                        replace_side_file=True)
    except Exception:
        log.exception("directory sync: the commit failed and the relay map could not be "
                      "rebuilt from the database; run writerelaymap")


def _claims(objects: list[DirectoryObject]) -> dict[str, set[str]]:
    claims: dict[str, set[str]] = defaultdict(set)
    for obj in objects:
        if obj.receives_mail:
            for address in obj.addresses:
                claims[address].add(obj.key)
    return claims


def _apply(objects: list[DirectoryObject], summary: SyncSummary, *, clear: bool,
           progress: Progress | None) -> set[str]:
    """Change users and addresses; return the addresses that only go into the map."""
    claims = _claims(objects)
    contested = {a for a, keys in claims.items() if len(keys) > 1}
    for address in sorted(contested):
        summary.conflicts.append(
            f"{address} is claimed by {len(claims[address])} directory objects; "
            "given to none of them"
        )
    extras = set(contested)
    for obj in objects:
        if obj.kind != PERSON and obj.receives_mail:
            extras.update(a for a in obj.addresses if a not in contested)

    people = [o for o in objects if o.kind == PERSON]
    owners = _users_for(people, summary, progress)
    wanted: dict[str, int] = {}
    for obj in people:
        user = owners.get(obj.key)
        if user is None or not obj.receives_mail:
            continue
        for address in obj.addresses:
            if address not in contested:
                wanted[address] = user.pk

    for obj in people:
        # An enabled mailbox the sync could not give a viewer user (a name clash with a
        # local user, an address too long for a user name) still receives mail.
        if obj.key not in owners and obj.receives_mail:
            extras.update(a for a in obj.addresses if a not in contested)

    seen = {user.pk for user in owners.values()}
    _retire_vanished(seen, summary, clear=clear)
    _apply_addresses(wanted, summary, clear=clear)
    summary.map_only = len(extras)
    return extras


def _users_for(people: list[DirectoryObject], summary: SyncSummary,
               progress: Progress | None) -> dict[str, User]:
    identities = {
        (i.guid or f"dn:{i.dn.lower()}"): i
        for i in DirectoryIdentity.objects.select_related("user")
    }
    by_dn = {i.dn.lower(): i for i in identities.values()}
    taken = {u.lower(): pk for u, pk in User.objects.values_list("username", "pk")}

    def identity_of(obj: DirectoryObject) -> DirectoryIdentity | None:
        return identities.get(obj.key) or (
            by_dn.get(obj.dn.lower()) if obj.guid is None else None)

    found = {identity.pk for identity in map(identity_of, people) if identity is not None}
    # Directory users whose object is gone, by user: a new object with the same primary
    # address (an account deleted and created again) takes one over.
    vanished = {i.user_id: i for i in identities.values() if i.pk not in found}
    owners: dict[str, User] = {}
    for done, obj in enumerate(people, 1):
        if progress:
            progress("apply", done, len(people))
        if obj.primary is None:
            summary.conflicts.append(f"{obj.dn} has no valid address; skipped")
            continue
        if len(obj.primary) > MAX_USERNAME_LENGTH:
            summary.conflicts.append(f"{obj.dn}: {obj.primary[:60]}... is too long for a "
                                     "user name; skipped")
            continue
        identity = identity_of(obj)
        if identity is None:
            identity = _take_over(vanished, taken.get(obj.primary), obj)
        if identity is None:
            user = _create_or_update_user(obj, taken, summary)
        else:
            user = _update_user(identity, obj, taken, summary)
        if user is not None:
            owners[obj.key] = user
    return owners


def _take_over(vanished: dict[int, DirectoryIdentity], user_pk: int | None,
               obj: DirectoryObject) -> DirectoryIdentity | None:
    """The identity of the vanished directory user named like `obj`'s primary address,
    now pointing at `obj`; None when there is none (local users and vadmin never are)."""
    identity = vanished.pop(user_pk, None) if user_pk is not None else None
    if identity is None:
        return None
    user = identity.user
    if user.is_superuser or user.username == settings.VADMIN_USERNAME:
        return None
    if (
        user.is_staff
        or user.groups.exists()
        or user.user_permissions.exists()
        or Address.objects.filter(user=user).exclude(source=Address.SOURCE_LDAP).exists()
    ):
        # Given by hand to the person before: not for whoever now holds the address.
        log.warning("directory sync: %s is not taken over by %s: it has rights or "
                    "addresses given by hand", user.username, obj.dn)
        return None
    log.info("directory sync: %s (was %s) takes over the user %s", obj.dn, identity.dn,
             user.username)
    identity.guid = obj.guid
    identity.dn = obj.dn
    identity.save(update_fields=["guid", "dn", "synced_at"])
    return identity


def _create_or_update_user(obj: DirectoryObject, taken: dict[str, int],
                           summary: SyncSummary) -> User | None:
    """A new user for `obj`; when a log-in has just made one for the same object (the
    insert clashes), that one, updated."""
    try:
        with transaction.atomic():
            return _create_user(obj, taken, summary)
    except IntegrityError:
        identity = _identity_of(obj)
        if identity is None:
            summary.conflicts.append(
                f"{obj.dn}: a user named {obj.primary} was made meanwhile; not synced")
            return None
        taken[identity.user.username.lower()] = identity.user_id
        return _update_user(identity, obj, taken, summary)


def _identity_of(obj: DirectoryObject) -> DirectoryIdentity | None:
    identities = DirectoryIdentity.objects.select_related("user")
    if obj.guid:
        return identities.filter(guid=obj.guid).first()
    return identities.filter(dn=obj.dn).first()


def _create_user(obj: DirectoryObject, taken: dict[str, int],
                 summary: SyncSummary) -> User | None:
    if obj.primary in taken:
        # Never adopt a local account of the same name: it has its own password and
        # owner, and taking it over would hand it to whoever controls the directory entry.
        summary.conflicts.append(
            f"{obj.dn}: a local user named {obj.primary} exists; not synced")
        return None
    user = User(username=obj.primary, email=obj.primary, is_active=not obj.disabled)
    user.set_unusable_password()
    user.save()
    DirectoryIdentity.objects.create(user=user, guid=obj.guid, dn=obj.dn)
    taken[obj.primary] = user.pk
    summary.users_added += 1
    return user


def _update_user(identity: DirectoryIdentity, obj: DirectoryObject, taken: dict[str, int],
                 summary: SyncSummary) -> User:
    user = identity.user
    changed: list[str] = []
    if user.username.lower() != obj.primary:
        if taken.get(obj.primary, user.pk) == user.pk:
            taken.pop(user.username.lower(), None)
            taken[obj.primary] = user.pk
            user.username = obj.primary
            changed.append("username")
        else:
            summary.conflicts.append(
                f"{obj.dn}: cannot rename {user.username} to {obj.primary}, the name is taken")
    if user.email != obj.primary:
        user.email = obj.primary
        changed.append("email")
    if user.is_active == obj.disabled:
        user.is_active = not obj.disabled
        changed.append("is_active")
        if obj.disabled:
            summary.users_disabled += 1
    if changed:
        user.save(update_fields=changed)
        if changed != ["is_active"] or not obj.disabled:
            summary.users_updated += 1
    if identity.dn != obj.dn:
        identity.dn = obj.dn
        identity.save(update_fields=["dn", "synced_at"])
        if not changed:
            summary.users_updated += 1
    return user


def _retire_vanished(seen: set[int], summary: SyncSummary, *, clear: bool) -> None:
    gone = User.objects.filter(directory_identity__isnull=False).exclude(pk__in=seen)
    if clear:
        count = gone.count()
        gone.delete()
        summary.users_deleted += count
    else:
        summary.users_disabled += gone.filter(is_active=True).update(is_active=False)


def _apply_addresses(wanted: dict[str, int], summary: SyncSummary, *, clear: bool) -> None:
    existing = {
        address: (pk, user_id, source)
        for pk, address, user_id, source in Address.objects.values_list(
            "pk", "address", "user_id", "source")
    }
    owner_names = dict(User.objects.values_list("pk", "username"))
    delete: list[int] = []
    for address, (pk, user_id, source) in existing.items():
        target = wanted.get(address)
        if target == user_id:
            continue
        if source == Address.SOURCE_LDAP or (clear and target is not None):
            delete.append(pk)
            if target is None:
                summary.addresses_removed += 1
    create: list[Address] = []
    deleted = set(delete)
    for address, user_id in wanted.items():
        current = existing.get(address)
        if current is None:
            summary.addresses_added += 1
        elif current[1] == user_id:
            continue
        elif current[0] in deleted:
            summary.addresses_moved += 1
        else:
            summary.conflicts.append(
                f"{address} belongs to the local user {owner_names.get(current[1])}; "
                f"not given to {owner_names.get(user_id)}")
            continue
        create.append(Address(address=address, user_id=user_id, source=Address.SOURCE_LDAP))
    Address.objects.filter(pk__in=delete).delete()
    Address.objects.bulk_create(create, batch_size=1000)


def user_for_login(dn: str, attrs: dict[str, list[bytes]]) -> User | None:
    """The viewer user of the directory person who just logged in, made if needed.

    None when the person's primary address is the name of a local user (never adopted).
    """
    obj = directory_object(PERSON, dn, attrs)
    if obj.primary is None or len(obj.primary) > MAX_USERNAME_LENGTH:
        return None
    summary = SyncSummary()
    with transaction.atomic():
        identity = (
            DirectoryIdentity.objects.select_related("user").filter(guid=obj.guid).first()
            if obj.guid else
            DirectoryIdentity.objects.select_related("user").filter(dn=obj.dn).first()
        )
        taken = {
            u.lower(): pk for u, pk in User.objects.filter(
                username__iexact=obj.primary).values_list("username", "pk")
        }
        if identity is None:
            identity = _take_over_at_login(obj, taken)
        if identity is None:
            user = _create_or_update_user(obj, taken, summary)
        else:
            user = _update_user(identity, obj, taken, summary)
        if user is not None:
            _refresh_addresses(user, obj)
    for conflict in summary.conflicts:
        log.warning("login of %s: %s", dn, conflict)
    return user


def _take_over_at_login(obj: DirectoryObject, taken: dict[str, int]) -> DirectoryIdentity | None:
    """As the sync does (`_take_over`), at a person's first login: the directory user named
    like `obj`'s primary address, when the object it was made for is no longer in the
    directory (an account deleted and made again). None when there is no such user, or
    its object may still be there (the directory cannot say: nothing is taken over)."""
    user_pk = taken.get(obj.primary)
    if user_pk is None:
        return None
    old = DirectoryIdentity.objects.select_related("user").filter(user_id=user_pk).first()
    if old is None or (obj.guid is not None and old.guid == obj.guid):
        return None
    try:
        if _in_directory(old):
            return None
    except DirectoryError as exc:
        log.warning("login of %s: cannot tell whether %s is still in the directory: %s",
                    obj.dn, old.dn, exc)
        return None
    return _take_over({user_pk: old}, user_pk, obj)


def _in_directory(identity: DirectoryIdentity) -> bool:
    """Whether the object `identity` was made for is still in the directory: by its
    objectGUID under every base DN (it may have moved), by its DN without one."""
    config = DirectoryConfig.from_settings()
    with connect(config) as conn:
        if identity.guid:
            assertion = "".join(f"\\{byte:02x}" for byte in bytes.fromhex(identity.guid))
            return any(
                True
                for base in config.base_dns
                for _ in conn.paged_search(base, f"(objectGUID={assertion})", ["objectGUID"])
            )
        try:
            return any(True for _ in conn.paged_search(
                identity.dn, "(objectClass=*)", ["objectGUID"], scope=ldap.SCOPE_BASE))
        except BaseDNNotFound:
            return False


def _refresh_addresses(user: User, obj: DirectoryObject) -> None:
    """Give the user the directory's addresses that nobody else holds and the last sync
    gave to no user (its side file lists those of groups, contacts and public folders and
    the contested ones); drop the ldap ones the directory no longer lists. The full sync
    settles the rest."""
    wanted = set(obj.addresses) if obj.receives_mail else set()
    held = dict(Address.objects.filter(address__in=wanted).values_list("address", "user_id"))
    if wanted:
        for address in relaymap.read_address_file(settings.RELAY_MAP_DIRECTORY_EXTRA):
            if address in wanted:
                held.setdefault(address, None)
    Address.objects.filter(user=user, source=Address.SOURCE_LDAP).exclude(
        address__in=wanted).delete()
    Address.objects.bulk_create([
        Address(address=a, user=user, source=Address.SOURCE_LDAP)
        for a in sorted(wanted) if a not in held
    ])
