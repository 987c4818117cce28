"""Forms of the administration console. They validate input; accounts.py changes things."""

from __future__ import annotations

from django import forms
from django.contrib.auth.forms import SetPasswordMixin, UserCreationForm
from django.contrib.auth.models import User

from directory import accounts
from quarantine.models import AuditEvent


class AddressesField(forms.CharField):
    """A textarea of addresses, one per line; cleans to a normalised, de-duplicated list."""

    widget = forms.Textarea(attrs={"rows": 6, "autocomplete": "off", "spellcheck": "false"})

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("required", False)
        kwargs.setdefault("help_text", "One e-mail address per line.")
        super().__init__(**kwargs)

    def prepare_value(self, value):
        if isinstance(value, list | tuple):
            return "\n".join(value)
        return value

    def clean(self, value) -> list[str]:
        text = super().clean(value) or ""
        return accounts.clean_addresses(text.splitlines())


def _add_conflict_errors(form: forms.Form, user: User | None) -> None:
    addresses = form.cleaned_data.get("addresses") or []
    for conflict in accounts.find_conflicts(addresses, user=user):
        form.add_error("addresses", str(conflict))


class AddUserForm(UserCreationForm):
    """Username, password twice (Django's validators), addresses."""

    addresses = AddressesField(label="Addresses")

    class Meta(UserCreationForm.Meta):
        fields = ("username",)

    def clean(self):
        cleaned = super().clean()
        _add_conflict_errors(self, None)
        return cleaned


class EditUserForm(SetPasswordMixin, forms.Form):
    """The user's local addresses and, for a user who logs in here, a new password.

    Directory (ldap) addresses are not in the box: the sync owns them."""

    addresses = AddressesField(label="Local addresses")

    def __init__(self, user: User, *args, with_password: bool, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.user = user
        if with_password:
            password1, password2 = SetPasswordMixin.create_password_fields(
                label1="New password", label2="New password confirmation"
            )
            password1.required = password2.required = False
            password1.help_text = "Leave empty to keep the current password. " + str(
                password1.help_text
            )
            self.fields["password1"] = password1
            self.fields["password2"] = password2

    @property
    def with_password(self) -> bool:
        return "password1" in self.fields

    def clean(self):
        cleaned = super().clean()
        _add_conflict_errors(self, self.user)
        if self.with_password:
            if cleaned.get("password1") and not cleaned.get("password2"):
                self.add_error("password2", "Enter the same password again.")
            self.validate_passwords()
            self.validate_password_for_user(self.user)
        return cleaned

    @property
    def new_password(self) -> str:
        return self.cleaned_data.get("password1") or ""


class ClearQuarantineForm(forms.Form):
    confirm = forms.BooleanField(
        label="Yes, delete every quarantined message of every user",
        error_messages={"required": "Tick the box to confirm clearing the whole quarantine."},
    )


class AuditFilterForm(forms.Form):
    """Query string of the audit page: an action to filter on and the id cursor."""

    action = forms.ChoiceField(
        required=False, choices=[("", "all actions"), *AuditEvent.Action.choices]
    )
    before = forms.IntegerField(required=False, min_value=1, widget=forms.HiddenInput)
