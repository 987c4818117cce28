"""The message list's query parameters, validated: a bad value is dropped, never an error."""

from __future__ import annotations

import base64
import binascii
import re
from datetime import UTC, datetime, timedelta

from django import forms

from quarantine.models import Category

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_CURSOR_RE = re.compile(r"^(-?\d{1,20})\.(\d{1,20})$")


def encode_cursor(received_at: datetime, row_id: int) -> str:
    """An opaque position in a newest-first list: the last row's (received_at, id)."""
    micros = (received_at - _EPOCH) // timedelta(microseconds=1)
    raw = f"{micros}.{row_id}".encode("ascii")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_cursor(value: str) -> tuple[datetime, int] | None:
    """(received_at, id) from `encode_cursor`, or None for anything else."""
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode("ascii")
    except (binascii.Error, ValueError):
        return None
    match = _CURSOR_RE.match(raw)
    if not match:
        return None
    try:
        when = _EPOCH + timedelta(microseconds=int(match.group(1)))
    except OverflowError:
        return None
    row_id = int(match.group(2))
    if row_id > 2**63 - 1:
        return None
    return when, row_id


class ListFilterForm(forms.Form):
    q = forms.CharField(required=False, max_length=200)
    category = forms.ChoiceField(required=False, choices=[("", "All"), *Category.choices])
    cursor = forms.CharField(required=False, max_length=64)
    user = forms.IntegerField(required=False, min_value=1, max_value=2**63 - 1)

    def clean_cursor(self) -> tuple[datetime, int] | None:
        value = self.cleaned_data.get("cursor") or ""
        return decode_cursor(value) if value else None

    def values(self) -> dict[str, object]:
        """The valid parameters; an invalid one is left out, as if it had not been given."""
        self.is_valid()
        return {name: self.cleaned_data.get(name) for name in self.fields}
