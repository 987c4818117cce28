"""Talking to the directory: one connection policy and a paged search.

The policy, in order:
1. `ldaps://host[:port]` with the server certificate checked against LDAP_CA_FILE (or the
   system store) and the host name checked against it;
2. StartTLS on `ldap://host[:port]`, with the same checks;
3. plain `ldap://` only when LDAP_ALLOW_INSECURE is on, logged as a warning every time.

LDAP_SERVER says where to start: `ldaps://host[:port]` tries LDAPS only; `ldap://host[:port]`
or `host:port` tries StartTLS then (if allowed) plain on that port; a bare `host` tries
LDAPS on 636, then StartTLS and plain on 389. Referrals are never followed (AD returns them
for its DNS partitions and following them hangs or binds anonymously), and every network
step has a timeout so that a dead server fails in seconds.

Every failure is a DirectoryError that names the server and the reason; the subclasses say
which kind, so that callers can tell "cannot connect" from "bad credentials".
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import ldap
from django.conf import settings
from ldap.controls import SimplePagedResultsControl
from ldap.ldapobject import LDAPObject

log = logging.getLogger(__name__)

LDAPS_PORT = 636
LDAP_PORT = 389


class DirectoryError(Exception):
    """The directory could not be used. `server` and `reason` say where and why."""

    def __init__(self, server: str, reason: str) -> None:
        super().__init__(f"{server}: {reason}")
        self.server = server
        self.reason = reason


class DirectoryNotConfigured(DirectoryError):
    pass


class DirectoryUnreachable(DirectoryError):
    """Cannot connect: no answer, connection refused, timeout, server went away."""


class DirectoryTLSError(DirectoryError):
    """The TLS handshake or the certificate check failed."""


class DirectoryCredentialsError(DirectoryError):
    """The server refused the bind DN or password."""


class BaseDNNotFound(DirectoryError):
    pass


class DirectoryIncomplete(DirectoryError):
    """The server answered with only part of the result (size or time limit)."""


@dataclass(frozen=True)
class DirectoryConfig:
    server: str
    bind_dn: str = ""
    bind_password: str = field(default="", repr=False)
    base_dns: tuple[str, ...] = ()
    ca_file: str = ""
    allow_insecure: bool = True
    page_size: int = 1000
    timeout: int = 10

    @classmethod
    def from_settings(cls) -> DirectoryConfig:
        if not settings.LDAP_SERVER:
            raise DirectoryNotConfigured("LDAP_SERVER", "no directory server is configured")
        return cls(
            server=settings.LDAP_SERVER,
            bind_dn=settings.LDAP_BIND_DN,
            bind_password=settings.LDAP_BIND_PASSWORD,
            base_dns=tuple(settings.LDAP_BASE_DN),
            ca_file=settings.LDAP_CA_FILE,
            allow_insecure=settings.LDAP_ALLOW_INSECURE,
            page_size=settings.LDAP_PAGE_SIZE,
            timeout=settings.LDAP_TIMEOUT,
        )


@dataclass(frozen=True)
class _Attempt:
    mode: str  # "ldaps", "starttls" or "plain"
    host: str
    port: int

    @property
    def url(self) -> str:
        scheme = "ldaps" if self.mode == "ldaps" else "ldap"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"


def _attempts(server: str, *, allow_insecure: bool) -> list[_Attempt]:
    text = server.strip()
    if "://" not in text:
        has_port = text.count(":") == 1 or text.startswith("[")
        text = f"ldap://{text}" if has_port else text
        if "://" not in text:
            attempts = [_Attempt("ldaps", text, LDAPS_PORT), _Attempt("starttls", text, LDAP_PORT)]
            if allow_insecure:
                attempts.append(_Attempt("plain", text, LDAP_PORT))
            return attempts
    parts = urlsplit(text)
    if parts.scheme not in ("ldap", "ldaps") or not parts.hostname:
        raise DirectoryNotConfigured(server, "LDAP_SERVER must be host, host:port, "
                                     "ldap://host[:port] or ldaps://host[:port]")
    try:
        port = parts.port
    except ValueError:
        raise DirectoryNotConfigured(server, "the port is not a number") from None
    if parts.scheme == "ldaps":
        return [_Attempt("ldaps", parts.hostname, port or LDAPS_PORT)]
    attempts = [_Attempt("starttls", parts.hostname, port or LDAP_PORT)]
    if allow_insecure:
        attempts.append(_Attempt("plain", parts.hostname, port or LDAP_PORT))
    return attempts


def validate_server(server: str) -> None:
    """Raise DirectoryNotConfigured when LDAP_SERVER cannot be read."""
    _attempts(server, allow_insecure=True)


def _reason(exc: ldap.LDAPError) -> str:
    detail = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
    desc = detail.get("desc") or type(exc).__name__
    info = detail.get("info")
    return f"{desc} ({info})" if info else str(desc)


def _looks_like_tls(reason: str) -> bool:
    lowered = reason.lower()
    return any(word in lowered for word in ("tls", "ssl", "certificate", "handshake"))


@dataclass
class Connection:
    """A connection made by the policy above. `mode` says how: ldaps, starttls or plain."""

    ldap: LDAPObject
    url: str
    mode: str
    config: DirectoryConfig

    def close(self) -> None:
        try:
            self.ldap.unbind_s()
        except ldap.LDAPError:
            pass

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def bind(self, dn: str, password: str) -> None:
        try:
            self.ldap.simple_bind_s(dn, password)
        except ldap.INVALID_CREDENTIALS:
            raise DirectoryCredentialsError(self.url, f"the server refused the bind as {dn}"
                                            ) from None
        except (ldap.SERVER_DOWN, ldap.TIMEOUT, ldap.CONNECT_ERROR) as exc:
            reason = _reason(exc)
            kind = DirectoryTLSError if _looks_like_tls(reason) else DirectoryUnreachable
            raise kind(self.url, reason) from None
        except ldap.LDAPError as exc:
            raise DirectoryError(self.url, f"bind as {dn} failed: {_reason(exc)}") from None

    def paged_search(
        self,
        base: str,
        filterstr: str,
        attrs: list[str] | None = None,
        *,
        scope: int = ldap.SCOPE_SUBTREE,
    ) -> Iterator[tuple[str, dict[str, list[bytes]]]]:
        """Every entry under `base` that matches, a page at a time (RFC 2696).

        Without the control AD stops at MaxPageSize (1000) entries, silently or with
        sizelimitExceeded; with it, the loop follows the cookie until the server says done.
        Search references (entries without a DN) are skipped.
        """
        control = SimplePagedResultsControl(True, size=self.config.page_size, cookie=b"")
        while True:
            try:
                msgid = self.ldap.search_ext(base, scope, filterstr, attrs,
                                             serverctrls=[control])
                _, data, _, controls = self.ldap.result3(msgid, timeout=self.config.timeout)
            except ldap.NO_SUCH_OBJECT:
                raise BaseDNNotFound(self.url, f"the base DN {base} does not exist") from None
            except (ldap.SIZELIMIT_EXCEEDED, ldap.TIMELIMIT_EXCEEDED,
                    ldap.ADMINLIMIT_EXCEEDED) as exc:
                raise DirectoryIncomplete(self.url, f"search under {base}: {_reason(exc)}"
                                          ) from None
            except (ldap.SERVER_DOWN, ldap.TIMEOUT, ldap.CONNECT_ERROR) as exc:
                raise DirectoryUnreachable(self.url, _reason(exc)) from None
            except ldap.LDAPError as exc:
                raise DirectoryError(self.url, f"search under {base}: {_reason(exc)}"
                                     ) from None
            for dn, entry in data:
                if dn is not None:
                    yield dn, entry
            cookie = next(
                (c.cookie for c in controls
                 if c.controlType == SimplePagedResultsControl.controlType),
                b"",
            )
            if not cookie:
                return
            control.cookie = cookie


def _initialize(attempt: _Attempt, config: DirectoryConfig) -> LDAPObject:
    conn = ldap.initialize(attempt.url)
    conn.set_option(ldap.OPT_PROTOCOL_VERSION, ldap.VERSION3)
    conn.set_option(ldap.OPT_REFERRALS, 0)
    conn.set_option(ldap.OPT_NETWORK_TIMEOUT, config.timeout)
    conn.set_option(ldap.OPT_TIMEOUT, config.timeout)
    if attempt.mode != "plain":
        conn.set_option(ldap.OPT_X_TLS_REQUIRE_CERT, ldap.OPT_X_TLS_DEMAND)
        conn.set_option(ldap.OPT_X_TLS_PROTOCOL_MIN, ldap.OPT_X_TLS_PROTOCOL_TLS1_2)
        if config.ca_file:
            conn.set_option(ldap.OPT_X_TLS_CACERTFILE, config.ca_file)
        # Applies the TLS options above to this connection; must come last.
        conn.set_option(ldap.OPT_X_TLS_NEWCTX, 0)
    return conn


def _probe_tls(attempt: _Attempt, config: DirectoryConfig) -> None:
    """A TLS handshake with a timeout before python-ldap tries: a server that accepts TCP
    but never speaks TLS makes libldap hang despite its own timeouts."""
    try:
        context = ssl.create_default_context(cafile=config.ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        # A missing or unreadable CA file is a TLS configuration error, not a crash.
        raise DirectoryTLSError(
            attempt.url, f"LDAP_CA_FILE {config.ca_file}: cannot load ({exc})"
        ) from None
    try:
        with socket.create_connection((attempt.host, attempt.port), timeout=config.timeout
                                      ) as raw, context.wrap_socket(
                                          raw, server_hostname=attempt.host):
            pass
    except ssl.SSLCertVerificationError as exc:
        raise DirectoryTLSError(attempt.url, f"certificate refused: {exc.verify_message}"
                                ) from None
    except ssl.SSLError as exc:
        raise DirectoryTLSError(attempt.url, f"TLS handshake failed: {exc.reason or exc}"
                                ) from None
    except TimeoutError:
        raise DirectoryUnreachable(attempt.url, "timed out") from None
    except OSError as exc:
        raise DirectoryUnreachable(attempt.url, f"cannot connect: {exc.strerror or exc}"
                                   ) from None


def _probe_tcp(attempt: _Attempt, config: DirectoryConfig) -> None:
    try:
        socket.create_connection((attempt.host, attempt.port), timeout=config.timeout).close()
    except TimeoutError:
        raise DirectoryUnreachable(attempt.url, "timed out") from None
    except OSError as exc:
        raise DirectoryUnreachable(attempt.url, f"cannot connect: {exc.strerror or exc}"
                                   ) from None


def _open(attempt: _Attempt, config: DirectoryConfig) -> Connection:
    if attempt.mode == "ldaps":
        _probe_tls(attempt, config)
    else:
        _probe_tcp(attempt, config)
    conn = _initialize(attempt, config)
    if attempt.mode == "starttls":
        try:
            conn.start_tls_s()
        except (ldap.SERVER_DOWN, ldap.TIMEOUT) as exc:
            raise DirectoryUnreachable(attempt.url, _reason(exc)) from None
        except ldap.LDAPError as exc:
            raise DirectoryTLSError(attempt.url, f"StartTLS failed: {_reason(exc)}") from None
    return Connection(ldap=conn, url=attempt.url, mode=attempt.mode, config=config)


def open_connection(config: DirectoryConfig | None = None) -> Connection:
    """A connection made by the policy, not bound yet."""
    config = config or DirectoryConfig.from_settings()
    errors: list[DirectoryError] = []
    unreachable: set[tuple[str, int]] = set()
    for attempt in _attempts(config.server, allow_insecure=config.allow_insecure):
        if attempt.mode == "plain":
            if (attempt.host, attempt.port) in unreachable:
                continue
            log.warning(
                "%s: connecting WITHOUT encryption (%s); set LDAP_ALLOW_INSECURE=False to "
                "refuse this", attempt.url, "; ".join(e.reason for e in errors) or "no TLS",
            )
        try:
            return _open(attempt, config)
        except DirectoryUnreachable as exc:
            unreachable.add((attempt.host, attempt.port))
            errors.append(exc)
        except DirectoryError as exc:
            errors.append(exc)
    if not errors:
        raise DirectoryNotConfigured(config.server, "nothing to try")
    last = errors[-1]
    reason = "; ".join(f"{e.server}: {e.reason}" for e in errors)
    tls_failed = any(isinstance(e, DirectoryTLSError) for e in errors)
    if tls_failed and not config.allow_insecure:
        raise DirectoryTLSError(
            config.server, f"{reason}; plain LDAP is not allowed (LDAP_ALLOW_INSECURE=False)"
        )
    raise type(last)(config.server, reason)


def connect(
    config: DirectoryConfig | None = None,
    *,
    bind_dn: str | None = None,
    password: str | None = None,
) -> Connection:
    """A connection bound as the sync account (or as `bind_dn` with `password`)."""
    config = config or DirectoryConfig.from_settings()
    conn = open_connection(config)
    try:
        conn.bind(config.bind_dn if bind_dn is None else bind_dn,
                  config.bind_password if password is None else password)
    except BaseException:
        conn.close()
        raise
    log.debug("connected to %s (%s)", conn.url, conn.mode)
    return conn
