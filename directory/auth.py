"""Logging in: the log-in page, and the backends of LOGIN_METHOD=ldap.

The page (LoginView below) is Django's, with the throttle of directory/throttle.py in
front: over a limit, no backend is asked at all and the answer is 429. A wrong password
and an unknown name get the same page.

Two backends, in this order (see AUTHENTICATION_BACKENDS in settings):
- LocalAccountBackend: vadmin, and accounts made locally, log in with the password kept
  here. A user that came from the directory never does: its password is the directory's.
- DirectoryBackend: people type an e-mail address (or their sAMAccountName, bare or as
  `DOMAIN\\user` when DOMAIN is LDAP_NETBIOS_DOMAIN). With the sync account we search for
  the one enabled person whose `mail`, `proxyAddresses` (`smtp:<address>`, compared without
  regard to case), `userPrincipalName` or `sAMAccountName` is that value, then bind as that
  person with the password typed. No match, several matches or a refused bind: no login.
  The viewer user is the one the sync keeps for that directory object (named by the
  primary address, whichever alias was typed), and its addresses are refreshed from the
  directory.

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
from django.contrib.auth import views as auth_views
from django.contrib.auth.backends import ModelBackend
from django_auth_ldap.backend import LDAPBackend
from django_auth_ldap.config import LDAPSearch, LDAPSearchUnion, LDAPSettings

from directory.ldap import DirectoryConfig, DirectoryError, open_connection
from directory.models import DirectoryIdentity
from directory.sync import ATTRIBUTES, user_for_login
from directory.throttle import Attempt, attempt_succeeded, client_ip, start_attempt

log = logging.getLogger(__name__)

ENABLED = "(!(userAccountControl:1.2.840.113556.1.4.803:=2))"
# An address cannot be a sAMAccountName (AD refuses "@" in one), so one filter serves both.
MATCHES_ADDRESS = ("(|(mail=%(user)s)(proxyAddresses=smtp:%(user)s)"
                   "(userPrincipalName=%(user)s)(sAMAccountName=%(user)s))")


def account_name(username: str) -> str:
    """`username` without a `DOMAIN\\` prefix when DOMAIN is LDAP_NETBIOS_DOMAIN (compared
    without regard to case). Any other prefix stays, and then matches nobody: a
    sAMAccountName cannot contain a backslash."""
    domain, sep, name = username.partition("\\")
    netbios = settings.LDAP_NETBIOS_DOMAIN.strip()
    if sep and netbios and domain.strip().casefold() == netbios.casefold():
        return name
    return username


class LoginView(auth_views.LoginView):
    """Django's log-in page behind the throttle."""

    template_name = "login.html"
    redirect_authenticated_user = True
    attempt: Attempt | None = None

    def post(self, request, *args, **kwargs):
        username = request.POST.get("username", "")
        if username.strip() and request.POST.get("password"):
            # Only attempts the form would authenticate are counted (it refuses a missing
            # name or password by itself).
            self.attempt = start_attempt(username, client_ip(request))
            if self.attempt.refused:
                context = self.get_context_data(form=self.form_class(request),
                                                retry_minutes=self.attempt.retry_minutes)
                return self.render_to_response(context, status=429)
        return super().post(request, *args, **kwargs)

    def form_valid(self, form):
        if self.attempt is not None:
            attempt_succeeded(self.attempt, username=form.get_user().get_username())
        return super().form_valid(form)


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
        username = account_name(username.strip()).strip()
        if not username:
            return None
        try:
            return super().authenticate(request, username=username,
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
