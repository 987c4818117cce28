"""The small async interfaces through which the engine talks to the outside.

The engine never imports Django: the quarantine sink and the recipient lookup are handed
to it, and the Django side (`quarantine.sink`) provides the real implementations.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class Profile:
    """A filter profile: a name and its settings (MessageWall profile keys, as strings)."""

    name: str = "default"
    settings: Mapping[str, str] = field(default_factory=dict)

    def get(self, key: str, default: str = "") -> str:
        return self.settings.get(key, default)


DEFAULT_PROFILE = Profile()


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
    ) -> str:
        """Keep a copy of a message and return its mail_id.

        Returns only once the copy is durably stored *and* indexed; raises on any failure,
        and the worker then answers 451 so that the sending side keeps the message.
        """
        ...


@runtime_checkable
class RecipientLookup(Protocol):
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
