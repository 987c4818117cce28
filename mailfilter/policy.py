"""From a message, its envelope and the transaction's profile to a verdict.

A verdict names the category that won (VIRUS > BANNED > SPAM > BADH, or None for clean)
and its destiny: `pass` (relay), `discard` (quarantine, answer 250), `bounce` (quarantine,
answer 5xx so that the sending MTA bounces) or `reject` (answer 5xx, keep nothing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from mailfilter.interfaces import Profile

DESTINIES = ("pass", "discard", "bounce", "reject")
CATEGORY_ORDER = ("VIRUS", "BANNED", "SPAM", "BADH")


@dataclass(frozen=True)
class Envelope:
    """What the engine knows of a transaction besides its content."""

    sender: str
    recipients: Sequence[str]
    client_address: str = ""
    client_name: str = ""
    helo: str = ""
    smtputf8: bool = False
    # front mode: the client is one of FILTER_RELAY_IPS (outbound mail, relay profile).
    relay_client: bool = False


@dataclass(frozen=True)
class Verdict:
    category: str | None
    destiny: str
    reasons: Sequence[str] = ()
    # Header fields to put on top of a passed message, e.g. X-Spam-Status.
    headers: Sequence[tuple[str, str]] = field(default=())

    def __post_init__(self) -> None:
        if self.destiny not in DESTINIES:
            raise ValueError(f"unknown destiny {self.destiny!r}")
        if self.category is not None and self.category not in CATEGORY_ORDER:
            raise ValueError(f"unknown category {self.category!r}")


CLEAN = Verdict(category=None, destiny="pass")


class Policy(Protocol):
    async def decide(self, message: bytes, envelope: Envelope, profile: Profile) -> Verdict: ...


class ProfilePolicy:
    """The checks a profile asks for.

    For now one: `reject=1` refuses every message of the profile (MessageWall's switch
    for addresses that must never receive mail).
    """

    async def decide(self, message: bytes, envelope: Envelope, profile: Profile) -> Verdict:
        if profile.get("reject") == "1":
            return Verdict(
                category=None,
                destiny="reject",
                reasons=(f"profile {profile.name} rejects all mail",),
            )
        return CLEAN


async def decide(message: bytes, envelope: Envelope, profile: Profile) -> Verdict:
    """The default policy's verdict."""
    return await ProfilePolicy().decide(message, envelope, profile)
