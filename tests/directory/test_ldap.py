"""The connection policy and the paged search, against a real slapd with TLS."""

from __future__ import annotations

import dataclasses
import socket
import time

import ldap
import pytest

from directory.ldap import (
    BaseDNNotFound,
    DirectoryConfig,
    DirectoryCredentialsError,
    DirectoryTLSError,
    DirectoryUnreachable,
    connect,
)
from tests.directory.slapd import BIG_OU, BIG_PEOPLE, SYNC_DN, SYNC_PW, WRONG_SERVER_NAME

pytestmark = pytest.mark.slapd


@pytest.fixture
def config(slapd) -> DirectoryConfig:
    return DirectoryConfig(server=slapd.ldaps_url, bind_dn=SYNC_DN, bind_password=SYNC_PW,
                           base_dns=(BIG_OU,), ca_file=str(slapd.ca_file),
                           allow_insecure=False, timeout=3)


def _tls_version(conn) -> str:
    return conn.ldap.get_option(ldap.OPT_X_TLS_VERSION) or ""


def test_ldaps_with_a_trusted_certificate_connects_and_binds(config):
    with connect(config) as conn:
        assert conn.mode == "ldaps"
        assert _tls_version(conn).startswith("TLS")
        assert conn.ldap.whoami_s() == f"dn:{SYNC_DN}"


def test_starttls_on_the_plain_port_connects_and_binds(config, slapd):
    with connect(dataclasses.replace(config, server=slapd.ldap_url)) as conn:
        assert conn.mode == "starttls"
        assert _tls_version(conn).startswith("TLS")
        assert conn.ldap.whoami_s() == f"dn:{SYNC_DN}"


def test_host_and_port_without_a_scheme_means_starttls(config, slapd):
    with connect(dataclasses.replace(config, server=f"127.0.0.1:{slapd.ldap_port}")) as conn:
        assert conn.mode == "starttls"


def test_a_certificate_from_an_unknown_ca_is_refused_over_ldaps(config, slapd):
    untrusted = dataclasses.replace(config, ca_file=str(slapd.untrusted_ca_file))
    with pytest.raises(DirectoryTLSError, match=r"certificate refused") as refused:
        connect(untrusted)
    assert slapd.ldaps_url in str(refused.value)


def test_a_missing_ca_file_is_a_tls_error_naming_the_file(config, tmp_path):
    missing = tmp_path / "no-such-ca.pem"
    with pytest.raises(DirectoryTLSError, match=r"LDAP_CA_FILE .*no-such-ca.pem: cannot load"):
        connect(dataclasses.replace(config, ca_file=str(missing)))


def test_a_certificate_for_another_host_name_is_refused_over_ldaps(config, slapd):
    wrong_host = dataclasses.replace(config, server=f"ldaps://{WRONG_SERVER_NAME}:{slapd.ldaps_port}")
    with pytest.raises(DirectoryTLSError, match=r"certificate refused.*(?i:host|IP)"):
        connect(wrong_host)


def test_a_certificate_for_another_host_name_is_refused_over_starttls(config, slapd):
    wrong_host = dataclasses.replace(config, server=f"ldap://{WRONG_SERVER_NAME}:{slapd.ldap_port}")
    with pytest.raises(DirectoryTLSError, match=r"StartTLS failed"):
        connect(wrong_host)


def test_plain_ldap_is_refused_when_tls_fails_and_insecure_is_not_allowed(config, slapd,
                                                                          caplog):
    untrusted = dataclasses.replace(config, server=slapd.ldap_url,
                                    ca_file=str(slapd.untrusted_ca_file))
    with pytest.raises(DirectoryTLSError, match=r"LDAP_ALLOW_INSECURE=False") as refused:
        connect(untrusted)
    assert slapd.ldap_url in str(refused.value)
    assert "WITHOUT encryption" not in caplog.text


def test_plain_ldap_is_used_with_a_warning_when_insecure_is_allowed(config, slapd, caplog):
    untrusted = dataclasses.replace(config, server=slapd.ldap_url, allow_insecure=True,
                                    ca_file=str(slapd.untrusted_ca_file))
    with connect(untrusted) as conn:
        assert conn.mode == "plain"
        assert not _tls_version(conn)
        assert conn.ldap.whoami_s() == f"dn:{SYNC_DN}"
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "WITHOUT encryption" in warnings[0].getMessage()
    assert slapd.ldap_url in warnings[0].getMessage()


def test_a_wrong_password_is_reported_as_bad_credentials(config):
    with pytest.raises(DirectoryCredentialsError, match=SYNC_DN):
        connect(dataclasses.replace(config, bind_password="not the password"))


def test_a_closed_port_is_reported_as_unreachable_quickly(config):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(DirectoryUnreachable, match=r"cannot connect"):
        connect(dataclasses.replace(config, server=f"ldaps://127.0.0.1:{port}"))
    assert time.monotonic() - started < 3


def test_a_server_that_never_speaks_tls_times_out(config):
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(DirectoryUnreachable, match=r"timed out"):
            connect(dataclasses.replace(config, server=f"ldaps://127.0.0.1:{port}", timeout=1))
        assert time.monotonic() - started < 4


def test_a_missing_base_dn_is_named_in_the_error(config):
    missing = f"ou=nowhere,{BIG_OU}"
    with connect(config) as conn, pytest.raises(BaseDNNotFound, match=missing):
        list(conn.paged_search(missing, "(objectClass=*)", ["cn"]))


def test_the_server_enforces_the_1000_entry_limit_on_plain_searches(config):
    with connect(config) as conn, pytest.raises(ldap.SIZELIMIT_EXCEEDED):
        conn.ldap.search_s(f"ou=people,{BIG_OU}", ldap.SCOPE_SUBTREE, "(objectClass=user)",
                           ["cn"])


@pytest.mark.parametrize("page_size", [1000, 333])
def test_paged_search_returns_every_entry(config, page_size):
    with connect(dataclasses.replace(config, page_size=page_size)) as conn:
        dns = [dn for dn, _ in conn.paged_search(
            f"ou=people,{BIG_OU}", "(&(objectCategory=person)(objectClass=user))", ["cn"])]
    assert len(dns) == len(set(dns)) == BIG_PEOPLE


def test_system_checks_name_a_missing_server_in_ldap_mode_and_a_bad_filter(settings):
    from directory.checks import check_directory_settings

    settings.LOGIN_METHOD = "ldap"
    settings.LDAP_SERVER = ""
    settings.LDAP_USER_FILTER = "(&(objectCategory=person)"
    ids = {problem.id for problem in check_directory_settings()}
    assert ids == {"directory.E001", "directory.E004"}
