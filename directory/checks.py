"""System checks for the directory settings that can be wrong (run by `manage.py check`)."""

from __future__ import annotations

import os

from django.conf import settings
from django.core.checks import Error, Warning, register

from directory.ldap import DirectoryError, validate_server


def _balanced(filterstr: str) -> bool:
    depth = 0
    for char in filterstr.replace("\\(", "").replace("\\)", ""):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth < 0:
            return False
    return depth == 0 and filterstr.startswith("(") and filterstr.endswith(")")


@register()
def check_directory_settings(app_configs=None, **kwargs):
    problems = []
    if settings.LOGIN_METHOD == "ldap" and not settings.LDAP_SERVER:
        problems.append(Error("LOGIN_METHOD=ldap but LDAP_SERVER is not set",
                              id="directory.E001"))
    if settings.LDAP_SERVER:
        try:
            validate_server(settings.LDAP_SERVER)
        except DirectoryError as exc:
            problems.append(Error(str(exc), id="directory.E002"))
        if not settings.LDAP_BASE_DN:
            problems.append(Warning("LDAP_SERVER is set but LDAP_BASE_DN is empty: the "
                                    "sync and LDAP login find nobody", id="directory.W001"))
    if settings.LDAP_CA_FILE and not os.access(settings.LDAP_CA_FILE, os.R_OK):
        problems.append(Error(f"LDAP_CA_FILE={settings.LDAP_CA_FILE} cannot be read",
                              id="directory.E003"))
    for name in ("LDAP_USER_FILTER", "LDAP_GROUP_FILTER", "LDAP_CONTACT_FILTER",
                 "LDAP_PUBLIC_FOLDER_FILTER", "LDAP_EXTRA_FILTER"):
        value = getattr(settings, name)
        if value and not _balanced(value):
            problems.append(Error(f"{name}={value!r} is not a parenthesised LDAP filter",
                                  id="directory.E004"))
    if not 0 <= settings.RELAY_MAP_MIN_RATIO <= 1:
        problems.append(Error(f"RELAY_MAP_MIN_RATIO={settings.RELAY_MAP_MIN_RATIO} must be "
                              "between 0 and 1", id="directory.E005"))
    return problems
