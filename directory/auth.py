"""Logging in with LOGIN_METHOD=ldap.

Two backends, in this order (see AUTHENTICATION_BACKENDS in settings):
- LocalAccountBackend: vadmin, and accounts made locally, log in with the password kept
  here. A user that came from the directory never does: its password is the directory's.
- DirectoryBackend: people type an e-mail address. With the sync account we search for the
  one enabled person whose `mail`, `proxyAddresses` (`smtp:<address>`, compared without
  regard to case) or `userPrincipalName` is that address, then bind as that person with the
  password typed. No match, several matches or a refused bind: no login. The viewer user
  is the one the sync keeps for that directory object (named by the primary address,
  whichever alias was typed), and its addresses are refreshed from the directory.

An empty, whitespace-only or NUL-carrying password is refused before the server is asked:
AD treats a simple bind with an empty password as an unauthenticated bind and reports
success. The typed address goes into the filter escaped once (RFC 4515) by
django-auth-ldap; the DN we bind with is the one the server returned, never built from
input. A directory that cannot be reached fails the login closed with the generic message.
"""

from __future__ import annotations

import logging

import ldap
from django.conf import settings
from django.contrib.auth.backends import ModelBackend
from django_auth_ldap.backend import LDAPBackend
from django_auth_ldap.config import LDAPSearch, LDAPSearchUnion, LDAPSettings

from directory.ldap import DirectoryConfig, DirectoryError, open_connection
from directory.models import DirectoryIdentity
from directory.sync import ATTRIBUTES, user_for_login

log = logging.getLogger(__name__)

ENABLED = "(!(userAccountControl:1.2.840.113556.1.4.803:=2))"
MATCHES_ADDRESS = "(|(mail=%(user)s)(proxyAddresses=smtp:%(user)s)(userPrincipalName=%(user)s))"


def usable_password(password: str | None) -> bool:
    return bool(password) and bool(password.strip()) and "\x00" not in password


class LocalAccountBackend(ModelBackend):
    """The local password check, for accounts that do not come from the directory."""

    def authenticate(self, request, username=None, password=None, **kwargs):
        # PostgreSQL refuses NUL in text: a name carrying one matches nobody here.
        if username is not None and "\x00" in username:
            return None
        return super().authenticate(request, username=username, password=password, **kwargs)

    def user_can_authenticate(self, user) -> bool:
        if not super().user_can_authenticate(user):
            return False
        return not DirectoryIdentity.objects.filter(user=user).exists()


class _PolicyLdap:
    """The python-ldap module as django-auth-ldap sees it, except that connections are
    opened by our policy (LDAPS or StartTLS with certificate checks, plain only when
    allowed, timeouts, no referrals) instead of a bare `ldap.initialize`."""

    def __getattr__(self, name: str):
        return getattr(ldap, name)

    def initialize(self, uri: str, bytes_mode: bool | None = None):
        return open_connection(DirectoryConfig.from_settings()).ldap


class DirectoryBackend(LDAPBackend):
    _policy_ldap = _PolicyLdap()

    @property
    def ldap(self):
        return self._policy_ldap

    @property
    def settings(self) -> LDAPSettings:
        if self._settings is None:
            self._settings = LDAPSettings(self.settings_prefix, _auth_ldap_settings())
        return self._settings

    @settings.setter
    def settings(self, value: LDAPSettings) -> None:
        self._settings = value

    def authenticate(self, request, username=None, password=None, **kwargs):
        if not usable_password(password):
            log.info("login refused before any bind: empty password")
            return None
        if not username or not username.strip() or "\x00" in username:
            return None
        try:
            return super().authenticate(request, username=username.strip(),
                                        password=password, **kwargs)
        except DirectoryError as exc:
            log.error("directory login of %r failed: %s", username[:320], exc)
            return None

    def get_or_build_user(self, username, ldap_user):
        # Read the entry as stored (django-auth-ldap lower-cases DNs and decodes binary
        # values), on the connection now bound as the person.
        try:
            found = ldap_user.connection.search_s(ldap_user.dn, ldap.SCOPE_BASE,
                                                  "(objectClass=*)", ATTRIBUTES)
        except ldap.LDAPError as exc:
            raise ldap_user.AuthenticationFailed(f"cannot read {ldap_user.dn}: {exc}"
                                                 ) from None
        entries = [(dn, attrs) for dn, attrs in found if dn is not None]
        if len(entries) != 1:
            raise ldap_user.AuthenticationFailed(f"cannot read {ldap_user.dn}")
        user = user_for_login(*entries[0])
        if user is None:
            raise ldap_user.AuthenticationFailed(
                f"{ldap_user.dn} has no usable primary address or a local user has its name")
        return user, False

    def get_user(self, user_id):
        # A session outlives a sync that disabled the account: check on every request.
        user = super().get_user(user_id)
        return user if user is not None and user.is_active else None


def _auth_ldap_settings() -> dict:
    """django-auth-ldap's settings, derived from ours (read when a login happens)."""
    person = settings.LDAP_USER_FILTER.replace("%", "%%")
    extra = (settings.LDAP_EXTRA_FILTER or "").replace("%", "%%")
    filterstr = f"(&{person}{ENABLED}{MATCHES_ADDRESS}{extra})"
    searches = [LDAPSearch(base, ldap.SCOPE_SUBTREE, filterstr, ["cn"])
                for base in settings.LDAP_BASE_DN]
    return {
        "SERVER_URI": settings.LDAP_SERVER,
        "BIND_DN": settings.LDAP_BIND_DN,
        "BIND_PASSWORD": settings.LDAP_BIND_PASSWORD,
        "USER_SEARCH": LDAPSearchUnion(*searches),
        "START_TLS": False,  # the connection policy has already done TLS
        "CONNECTION_OPTIONS": {},
        "BIND_AS_AUTHENTICATING_USER": True,
        "PERMIT_EMPTY_PASSWORD": False,
        "CACHE_TIMEOUT": 0,
        "ALWAYS_UPDATE_USER": False,
        "USER_ATTR_MAP": {},
        "FIND_GROUP_PERMS": False,
        "MIRROR_GROUPS": None,
    }
