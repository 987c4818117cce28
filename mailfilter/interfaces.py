"""The small async interfaces through which the engine talks to the outside.

The engine never imports Django: the quarantine sink and the recipient lookup are handed
to it, and the Django side (`quarantine.sink`) provides the real implementations.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

from mailfilter.profiles import Profile

__all__ = [
    "DEFAULT_PROFILE",
    "Profile",
    "QuarantineSink",
    "RecipientLookup",
    "StaticRecipientLookup",
]

# The profile of a transaction when nothing chose one: every MessageWall variable at its
# documented default (no scored rules, no banned names, no signatures).
DEFAULT_PROFILE = Profile(name="default")


@runtime_checkable
class QuarantineSink(Protocol):
    async def write(
        self,
        *,
        category: str,
        message: bytes,
        sender: str,
        recipients: Sequence[str],
        reasons: Sequence[str],
        headers: Sequence[tuple[str, str]] = (),
    ) -> str:
        """Keep a copy of a message and return its mail_id.

        `headers` are the quarantine header fields in amavisd-new's format that say why
        the message is held (`X-Amavis-Alert`, `X-Spam-*`); without them the sink writes
        its own from `category` and `reasons`.

        Returns only once the copy is durably stored *and* indexed; raises on any failure,
        and the worker then answers 451 so that the sending side keeps the message.
        """
        ...


@runtime_checkable
class RecipientLookup(Protocol):
    """Chooses the profile of each envelope recipient.

    A lookup may also offer `relay_profile() -> Profile | None`: the profile of mail that
    one of our own clients (FILTER_RELAY_IPS) sends out; the worker's built-in `relay`
    profile is used when it does not.
    """

    async def profile_for(self, address: str) -> Profile | None:
        """The recipient's profile, or None when the address is not one of ours."""
        ...


class StaticRecipientLookup:
    """Profiles from a fixed mapping (lower-cased addresses), with a default for the rest.

    With `default=None`, addresses that are not in the mapping are unknown.
    """

    def __init__(
        self,
        profiles: Mapping[str, Profile] | None = None,
        *,
        default: Profile | None = DEFAULT_PROFILE,
    ) -> None:
        self.profiles = {k.lower(): v for k, v in (profiles or {}).items()}
        self.default = default

    async def profile_for(self, address: str) -> Profile | None:
        return self.profiles.get(address.lower(), self.default)
