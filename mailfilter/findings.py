"""What a check reports: one finding per thing it found.

The policy sums SPAM scores and lets the highest category win
(VIRUS > BANNED > SPAM > BADH); `name` is stable so that statistics can count findings by
kind, and `detail` is a human sentence for the quarantine reasons.
"""

from __future__ import annotations

from dataclasses import dataclass

CATEGORIES = ("VIRUS", "BANNED", "SPAM", "BADH")


@dataclass(frozen=True)
class Finding:
    category: str
    name: str
    score: float = 0.0
    detail: str = ""

    def __post_init__(self) -> None:
        if self.category not in CATEGORIES:
            raise ValueError(f"unknown finding category {self.category!r}")
