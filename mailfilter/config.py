"""The filter worker's configuration, read from the environment.

`FilterConfig.from_env()` is the only place that reads `FILTER_*` variables; every error
names the variable and the value it could not read, so that a typo stops the start with a
clear message instead of silently falling back to a default. The engine itself only ever
sees a `FilterConfig`, which tests build directly.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

MODES = ("content_filter", "proxy_filter", "front")
BARE_LF_POLICIES = ("reject", "normalise")
# What a virus scan that could not be completed (clamd down, timing out, over its limits)
# means for the message: a 451 (the sender keeps it), delivery marked as unscanned, or the
# quarantine.
VIRUS_SCAN_FAIL_POLICIES = ("tempfail", "pass-with-header", "quarantine")


class ConfigError(ValueError):
    """A FILTER_* variable holds a value the worker cannot use; the message names it."""


# Every FILTER_* variable there is (runfilter reads FILTER_USER and FILTER_PID_FILE itself):
# any other is a typo, refused rather than ignored.
KNOWN_VARIABLES = frozenset("FILTER_" + name for name in (
    "BANNER", "BARE_LF", "CHECK_TIMEOUT", "COMMAND_TIMEOUT", "DATA_TIMEOUT",
    "DEFAULT_PROFILE", "DNS_SERVERS", "DNS_TIMEOUT", "HOSTNAME", "LISTEN", "LMTP",
    "MAX_BACKENDS", "MAX_CLIENTS", "MAX_COMMANDS", "MAX_DATA_BYTES", "MAX_HEADER_COUNT",
    "MAX_LINE_LENGTH",
    "MAX_MESSAGE_SIZE", "MAX_PER_IP", "MAX_RECIPIENTS", "METRICS_LISTEN", "MIN_DATA_RATE",
    "MODE", "NEXT_HOP", "NEXT_HOP_LMTP", "PID_FILE", "PROCESSES", "RELAY_COMMAND_TIMEOUT",
    "RELAY_CONNECT_TIMEOUT", "RELAY_DATA_TIMEOUT", "RELAY_DOMAINS", "RELAY_IDLE_TIMEOUT",
    "RELAY_IPS", "RELAY_MAP", "RELAY_PROFILE", "SPECIAL_USERS", "TLS_CERT", "TLS_KEY",
    "USER", "XFORWARD_HOSTS",
))


@dataclass(frozen=True)
class FilterConfig:
    """Everything the worker needs to know; defaults are the content_filter layout.

    Sizes are in octets, times in seconds. A limit of 0 means "no limit" only where the
    field says so.
    """

    listen_host: str = "127.0.0.1"
    listen_port: int = 10024
    next_hop_host: str = "127.0.0.1"
    next_hop_port: int = 10025
    # content_filter: after Postfix's queue (the client is Postfix's smtp/lmtp client).
    # proxy_filter: Postfix's smtpd_proxy_filter (one message per connection).
    # front: the worker faces other MTAs itself; unknown recipients are refused at RCPT.
    mode: str = "content_filter"
    # Speak LMTP on the listener (one end-of-data reply per recipient, RFC 2033).
    lmtp: bool = False
    hostname: str = "localhost"
    max_message_size: int = 50 * 1024 * 1024
    # Octets of message text the sessions of one process hold at once (0: four messages
    # of max_message_size); a message that does not fit is answered 452.
    max_data_bytes: int = 0
    # Longest line of message text, without its CRLF (RFC 5322: 998).
    max_line_length: int = 998
    max_header_count: int = 1000
    max_recipients: int = 1000
    # Idle time allowed between two commands, and between two reads inside DATA.
    command_timeout: float = 300.0
    data_timeout: float = 300.0
    # Inside DATA the client must also keep an average of this many octets a second
    # (after the first data_timeout seconds), so that a trickle cannot hold a
    # connection for ever; 0 turns the check off.
    min_data_rate: int = 500
    max_clients: int = 100
    # Connections at the same time from one address; 0 means no per-address limit.
    max_per_ip: int = 20
    # Commands allowed in a session between two accepted messages.
    max_commands: int = 2000
    bare_lf: str = "normalise"
    # Peers allowed to send XFORWARD (Postfix's smtpd_authorized_xforward_hosts).
    xforward_hosts: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    # Next hop: connections kept at most, and how long each step may take.
    max_backends: int = 20
    relay_connect_timeout: float = 30.0
    relay_command_timeout: float = 300.0
    relay_data_timeout: float = 600.0
    relay_idle_timeout: float = 20.0
    metrics_host: str = ""
    metrics_port: int = 0
    # The next hop speaks LMTP (FILTER_NEXT_HOP=lmtp:host:port): one reply per recipient.
    next_hop_lmtp: bool = False
    # Text after the host name in the 220 greeting.
    banner: str = "ESMTP spamviewer"
    # STARTTLS on the listener with this certificate chain and key (PEM files).
    tls_cert: str = ""
    tls_key: str = ""
    # front mode: recipients accepted are those in the relay map (Postfix `address OK`
    # lines, `@domain` for a whole domain) and every address of the relay domains.
    relay_map_path: str = ""
    relay_domains: tuple[str, ...] = ()
    # front mode: clients that may relay to any address (their mail gets the relay profile).
    relay_ips: tuple[str, ...] = ()
    # Worker processes sharing the listening port (SO_REUSEPORT); limits are per process.
    # With more than one, their parent serves the metrics endpoint with the sums over all.
    processes: int = 1
    # Content checks. Profiles: MessageWall files in profile_dir (empty: one built-in
    # profile like the example Medium for every recipient); the default and relay profiles
    # by name; a special-users file (`address-or-domain profile` lines).
    profile_dir: str = ""
    default_profile: str = "Medium"
    relay_profile: str = "Relay"
    special_users: str = ""
    # clamd on a unix socket or host:port; neither set: no clamd (only the profiles'
    # virus_scan signatures). spamd likewise (spamd_host empty: no spamd).
    clamd_socket: str = ""
    clamd_host: str = ""
    clamd_port: int = 3310
    clamd_timeout: float = 60.0
    spamd_host: str = ""
    spamd_port: int = 783
    spamd_timeout: float = 30.0
    virus_scan_fail: str = "tempfail"
    # All checks of one message together (parsing, scanners); then 451.
    check_timeout: float = 90.0
    # Name servers for the profiles' DNS checks; empty: the checks are off (the lines are
    # ignored), "system": the resolver of /etc/resolv.conf.
    dns_servers: tuple[str, ...] = ()
    dns_timeout: float = 4.0
    _networks: tuple = field(default=(), repr=False, compare=False)
    _relay_networks: tuple = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"FILTER_MODE={self.mode!r}: expected one of {', '.join(MODES)}")
        if self.bare_lf not in BARE_LF_POLICIES:
            raise ConfigError(
                f"FILTER_BARE_LF={self.bare_lf!r}: expected one of {', '.join(BARE_LF_POLICIES)}"
            )
        object.__setattr__(
            self, "_networks", _networks("FILTER_XFORWARD_HOSTS", self.xforward_hosts)
        )
        object.__setattr__(
            self, "_relay_networks", _networks("FILTER_RELAY_IPS", self.relay_ips)
        )
        object.__setattr__(
            self, "relay_domains", tuple(d.lower().strip(".") for d in self.relay_domains)
        )
        if 0 < self.max_data_bytes < self.max_message_size:
            raise ConfigError(
                f"FILTER_MAX_DATA_BYTES={self.max_data_bytes} is below FILTER_MAX_MESSAGE_SIZE="
                f"{self.max_message_size}: a message of the largest size would never fit"
            )
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("FILTER_TLS_CERT and FILTER_TLS_KEY: set both or neither")
        if any(ch in self.banner for ch in "\r\n\0"):
            raise ConfigError("FILTER_BANNER: must be one line")
        if not _HOSTNAME.fullmatch(self.hostname):
            # It goes into the greeting, every Received field and the EHLO to the next hop.
            raise ConfigError(f"FILTER_HOSTNAME={self.hostname!r}: expected a host name")
        if self.virus_scan_fail not in VIRUS_SCAN_FAIL_POLICIES:
            raise ConfigError(
                f"VIRUS_SCAN_FAIL={self.virus_scan_fail!r}: expected one of "
                f"{', '.join(VIRUS_SCAN_FAIL_POLICIES)}"
            )
        if self.special_users and not self.profile_dir:
            raise ConfigError("FILTER_SPECIAL_USERS needs PROFILE_DIR: it names profiles")

    @property
    def metrics_enabled(self) -> bool:
        return bool(self.metrics_host)

    def xforward_allowed(self, address: str | None) -> bool:
        return _in_networks(address, self._networks)

    def relay_allowed(self, address: str | None) -> bool:
        """True for a client in FILTER_RELAY_IPS (front mode: may send to any address)."""
        return _in_networks(address, self._relay_networks)

    def with_changes(self, **changes) -> FilterConfig:
        return replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> FilterConfig:
        """Build the configuration from FILTER_* variables (os.environ by default)."""
        env = _Env(os.environ if environ is None else environ)
        listen_host, listen_port = env.address("FILTER_LISTEN", "127.0.0.1:10024")
        next_hop = env.get("FILTER_NEXT_HOP", "127.0.0.1:10025")
        hop_lmtp = next_hop.lower().startswith("lmtp:")
        if hop_lmtp or next_hop.lower().startswith("smtp:"):
            next_hop = next_hop[5:]
        hop_host, hop_port = env.parse_address("FILTER_NEXT_HOP", next_hop)
        hop_lmtp = env.bool("FILTER_NEXT_HOP_LMTP", hop_lmtp)
        unknown = sorted(
            name for name in env.environ
            if name.startswith("FILTER_") and name not in KNOWN_VARIABLES
        )
        if unknown:
            raise ConfigError(
                f"{', '.join(unknown)}: not a setting of the filter worker "
                "(docs/configuration.md lists them)"
            )
        if env.get("FILTER_MODE", "") == "front" and not (
            env.get("FILTER_RELAY_MAP", "") or env.get("FILTER_RELAY_DOMAINS", "")
        ):
            raise ConfigError(
                "FILTER_MODE=front needs FILTER_RELAY_MAP or FILTER_RELAY_DOMAINS: "
                "without them no recipient would be refused (an open relay)"
            )
        metrics = env.get("FILTER_METRICS_LISTEN", "")
        metrics_host, metrics_port = (
            env.address("FILTER_METRICS_LISTEN", metrics) if metrics else ("", 0)
        )
        return cls(
            listen_host=listen_host,
            listen_port=listen_port,
            next_hop_host=hop_host,
            next_hop_port=hop_port,
            mode=env.choice("FILTER_MODE", "content_filter", MODES),
            lmtp=env.bool("FILTER_LMTP", False),
            hostname=env.get("FILTER_HOSTNAME", "") or _default_hostname(),
            max_message_size=env.int("FILTER_MAX_MESSAGE_SIZE", 50 * 1024 * 1024, minimum=1024),
            max_data_bytes=env.int("FILTER_MAX_DATA_BYTES", 0, minimum=0),
            max_line_length=env.int("FILTER_MAX_LINE_LENGTH", 998, minimum=78),
            max_header_count=env.int("FILTER_MAX_HEADER_COUNT", 1000, minimum=1),
            max_recipients=env.int("FILTER_MAX_RECIPIENTS", 1000, minimum=1),
            command_timeout=env.float("FILTER_COMMAND_TIMEOUT", 300.0, minimum=0.1),
            data_timeout=env.float("FILTER_DATA_TIMEOUT", 300.0, minimum=0.1),
            min_data_rate=env.int("FILTER_MIN_DATA_RATE", 500, minimum=0),
            max_clients=env.int("FILTER_MAX_CLIENTS", 100, minimum=1),
            max_per_ip=env.int("FILTER_MAX_PER_IP", 20, minimum=0),
            max_commands=env.int("FILTER_MAX_COMMANDS", 2000, minimum=10),
            bare_lf=env.choice("FILTER_BARE_LF", "normalise", BARE_LF_POLICIES),
            xforward_hosts=tuple(env.list("FILTER_XFORWARD_HOSTS", ["127.0.0.0/8", "::1/128"])),
            max_backends=env.int("FILTER_MAX_BACKENDS", 20, minimum=1),
            relay_connect_timeout=env.float("FILTER_RELAY_CONNECT_TIMEOUT", 30.0, minimum=0.1),
            relay_command_timeout=env.float("FILTER_RELAY_COMMAND_TIMEOUT", 300.0, minimum=0.1),
            relay_data_timeout=env.float("FILTER_RELAY_DATA_TIMEOUT", 600.0, minimum=0.1),
            relay_idle_timeout=env.float("FILTER_RELAY_IDLE_TIMEOUT", 20.0, minimum=0.0),
            metrics_host=metrics_host,
            metrics_port=metrics_port,
            next_hop_lmtp=hop_lmtp,
            banner=env.get("FILTER_BANNER", "ESMTP spamviewer"),
            tls_cert=env.get("FILTER_TLS_CERT", ""),
            tls_key=env.get("FILTER_TLS_KEY", ""),
            relay_map_path=env.get("FILTER_RELAY_MAP", ""),
            relay_domains=tuple(env.list("FILTER_RELAY_DOMAINS", [])),
            relay_ips=tuple(env.list("FILTER_RELAY_IPS", [])),
            processes=env.int("FILTER_PROCESSES", 1, minimum=1),
            profile_dir=env.get("PROFILE_DIR", ""),
            default_profile=env.get("FILTER_DEFAULT_PROFILE", "Medium"),
            relay_profile=env.get("FILTER_RELAY_PROFILE", "Relay"),
            special_users=env.get("FILTER_SPECIAL_USERS", ""),
            clamd_socket=env.get("CLAMD_SOCKET", ""),
            clamd_host=env.get("CLAMD_HOST", ""),
            clamd_port=env.int("CLAMD_PORT", 3310, minimum=1, maximum=65535),
            clamd_timeout=env.float("CLAMD_TIMEOUT", 60.0, minimum=0.1),
            spamd_host=env.get("SPAMD_HOST", ""),
            spamd_port=env.int("SPAMD_PORT", 783, minimum=1, maximum=65535),
            spamd_timeout=env.float("SPAMD_TIMEOUT", 30.0, minimum=0.1),
            virus_scan_fail=env.choice("VIRUS_SCAN_FAIL", "tempfail", VIRUS_SCAN_FAIL_POLICIES),
            check_timeout=env.float("FILTER_CHECK_TIMEOUT", 90.0, minimum=1.0),
            dns_servers=tuple(
                item.strip() for item in env.get("FILTER_DNS_SERVERS", "").split(",")
                if item.strip()
            ),
            dns_timeout=env.float("FILTER_DNS_TIMEOUT", 4.0, minimum=0.1),
        )


def _networks(name: str, values: tuple[str, ...]) -> tuple:
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value))
        except ValueError:
            try:
                wide = ipaddress.ip_network(value, strict=False)
            except ValueError:
                raise ConfigError(f"{name}: {value!r} is not an address or network") from None
            # 192.0.2.77/16 would let a whole /16 in where one host was probably meant.
            raise ConfigError(
                f"{name}: {value!r} has host bits set; write the network {wide} or the "
                "address alone"
            ) from None
    return tuple(networks)


# A host name (letters, digits, hyphens, dots, underscores) or an address literal.
_HOSTNAME = re.compile(r"[A-Za-z0-9_.-]{1,253}|\[(?:IPv6:)?[0-9A-Fa-f:.]+\]")


def client_address(value: str) -> str:
    """A client address as Postfix's XFORWARD ADDR gives it, without its `IPV6:` prefix."""
    return value[5:] if value[:5].upper() == "IPV6:" else value


def _in_networks(address: str | None, networks: tuple) -> bool:
    """Whether `address` (as a peer or Postfix's XFORWARD gives it: `IPV6:` prefixed, with
    a zone, or IPv4 mapped into IPv6 by a dual-stack listener) is in `networks`."""
    if not address:
        return False
    address = client_address(address)
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    mapped = ip.ipv4_mapped if ip.version == 6 else None
    return any(ip in net or (mapped is not None and mapped in net) for net in networks)


def _default_hostname() -> str:
    import socket

    return socket.getfqdn() or "localhost"


class _Env:
    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ

    def get(self, name: str, default: str) -> str:
        value = self.environ.get(name)
        return default if value is None or value.strip() == "" else value.strip()

    def int(self, name: str, default: int, *, minimum: int, maximum: int | None = None) -> int:
        raw = self.get(name, str(default))
        if not re.fullmatch(r"-?[0-9]+", raw):
            raise ConfigError(f"{name}={raw!r}: expected a whole number")
        value = int(raw)
        if value < minimum:
            raise ConfigError(f"{name}={value}: must be at least {minimum}")
        if maximum is not None and value > maximum:
            raise ConfigError(f"{name}={value}: must be at most {maximum}")
        return value

    def float(self, name: str, default: float, *, minimum: float) -> float:
        raw = self.get(name, str(default))
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r}: expected a number of seconds") from None
        if not value >= minimum:
            raise ConfigError(f"{name}={raw}: must be at least {minimum}")
        return value

    def bool(self, name: str, default: bool) -> bool:
        raw = self.get(name, "")
        if raw == "":
            return default
        if raw in ("True", "true", "1", "yes"):
            return True
        if raw in ("False", "false", "0", "no"):
            return False
        raise ConfigError(f"{name}={raw!r}: expected True or False")

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        raw = self.get(name, default)
        if raw == "normalize" and "normalise" in choices:
            raw = "normalise"
        if raw not in choices:
            raise ConfigError(f"{name}={raw!r}: expected one of {', '.join(choices)}")
        return raw

    def list(self, name: str, default: list[str]) -> list[str]:
        raw = self.environ.get(name)
        if raw is None:
            return list(default)
        return [item.strip() for item in raw.split(",") if item.strip()]

    def address(self, name: str, raw: str) -> tuple[str, int]:
        """`host:port`, `[v6]:port` or `:port`; a port of 0 picks a free one."""
        return self.parse_address(name, self.get(name, raw))

    def parse_address(self, name: str, value: str) -> tuple[str, int]:
        host, sep, port = value.rpartition(":")
        if not sep or not (port.isascii() and port.isdigit()) or int(port) > 65535:
            raise ConfigError(f"{name}={value!r}: expected host:port")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        return host or "127.0.0.1", int(port)


@dataclass(frozen=True)
class PostfixSnippet:
    """The Postfix settings that put the worker in the mail flow, for `config`'s mode.

    `main` goes to main.cf; `services` are master.cf entries: the service key
    (`name/type`), its master.cf line and its `-o` overrides. `text()` renders both files'
    lines for people; `postconf_arguments()` the same as `postconf` invocations.
    """

    main: Mapping[str, str]
    services: tuple[tuple[str, str, Mapping[str, str]], ...]

    def text(self) -> str:
        lines = ["# main.cf"]
        lines += [f"{name} = {value}" for name, value in self.main.items()]
        lines += ["", "# master.cf"]
        for _, line, overrides in self.services:
            lines.append(line)
            lines += [f"    -o {name}={value}" for name, value in overrides.items()]
        return "\n".join(lines) + "\n"

    def postconf_arguments(self) -> list[list[str]]:
        commands = [["-e", f"{name}={value}"] for name, value in self.main.items()]
        for key, line, overrides in self.services:
            commands.append(["-Me", f"{key}={line}"])
            if overrides:
                commands.append(["-P", *(f"{key}/{n}={v}" for n, v in overrides.items())])
        return commands


def postfix_snippet(
    config: FilterConfig,
    *,
    inbound: str = "smtp",
    transport: str = "spamviewer",
    relay_domains: tuple[str, ...] | list[str] = (),
    relay_next_hop: str = "",
    relay_map: str = "",
) -> PostfixSnippet:
    """What Postfix needs around the worker (FILTER_README / SMTPD_PROXY_README layouts).

    content_filter: `content_filter` to a `transport` service that speaks SMTP (or LMTP,
    with FILTER_LMTP) to the worker. proxy_filter: `smtpd_proxy_filter` on the `inbound`
    smtpd service (`smtp`, or `host:port` for a listener of its own). Both: the
    reinjection smtpd on FILTER_NEXT_HOP, which relays for the worker's address only
    (its own `mynetworks`), trusts its XFORWARD, and has no content_filter (or mail loops).
    Postfix waits longer for each of the worker's replies than the worker itself may take
    (its checks, then the next hop), so that it never gives up on a message the worker
    then delivers, which would deliver it twice.

    Optionally, for main.cf: `relay_domains`, `relay_next_hop` (the server that takes final
    delivery, as `relay_transport`) and `relay_map` (a table such as
    `hash:/path/relay_recipients`, as `relay_recipient_maps`; not in front mode, where the
    worker checks recipients itself).
    """
    if config.mode != "front" and config.listen_host in ("", "0.0.0.0", "::", "*"):
        # Postfix would be told to connect to 0.0.0.0, and the reinjection smtpd to trust
        # 0.0.0.0/32 as the only peer: the filter's passed mail would be refused there.
        raise ConfigError(
            f"FILTER_LISTEN={config.listen_host or '*'}:{config.listen_port}: Postfix needs "
            "the address it reaches the filter on, not a wildcard; set FILTER_LISTEN to "
            f"that address (127.0.0.1:{config.listen_port} when both run on one host)"
        )
    worker = f"{_postfix_host(config.listen_host)}:{config.listen_port}"
    loopback = config.next_hop_host in ("127.0.0.1", "localhost", "::1")
    peers = "127.0.0.0/8" if loopback else _postfix_network(config.listen_host)
    # The longest the worker may take to answer MAIL or RCPT (it connects to the next hop
    # and passes the command on), and to answer the end of data (its checks, then the next
    # hop's reply), each with a minute to spare.
    command_limit = int(config.relay_connect_timeout + config.relay_command_timeout) + 60
    data_limit = int(config.check_timeout + config.relay_data_timeout) + 60
    main: dict[str, str] = {}
    if relay_domains:
        main["relay_domains"] = ", ".join(relay_domains)
    if relay_next_hop:
        main["relay_transport"] = f"relay:{_postfix_next_hop(relay_next_hop)}"
    if relay_map and config.mode != "front":
        main["relay_recipient_maps"] = relay_map
    services: list[tuple[str, str, Mapping[str, str]]] = []
    if config.mode == "content_filter":
        client = "lmtp" if config.lmtp else "smtp"
        main["content_filter"] = f"{transport}:[{config.listen_host}]:{config.listen_port}"
        # The worker sees the envelope as the client sent it.
        main["receive_override_options"] = "no_address_mappings"
        # End DATA only at <CR><LF>.<CR><LF> (SMTP smuggling, CVE-2023-51764); the
        # default exclusions ($mynetworks) leave trusted clients alone.
        main["smtpd_forbid_bare_newline"] = "normalize"
        if config.next_hop_lmtp and not config.lmtp:
            # One end-of-data reply cannot carry an LMTP next hop's per-recipient answers.
            main[f"{transport}_destination_recipient_limit"] = "1"
        services.append(
            (
                f"{transport}/unix",
                f"{transport} unix - - n - {config.max_clients} {client}",
                {
                    f"{client}_send_xforward_command": "yes",
                    "disable_mime_output_conversion": "yes",
                    f"{client}_generic_maps": "",
                    f"{client}_mail_timeout": f"{command_limit}s",
                    f"{client}_rcpt_timeout": f"{command_limit}s",
                    f"{client}_data_done_timeout": f"{data_limit}s",
                },
            )
        )
    elif config.mode == "proxy_filter":
        line = (
            f"{inbound} inet n - n - - smtpd"
            if ":" in inbound
            else f"{inbound} inet n - y - - smtpd"
        )
        services.append(
            (
                f"{inbound}/inet",
                line,
                {
                    "smtpd_proxy_filter": worker,
                    # One limit for every reply of the proxy, the end of data's included.
                    "smtpd_proxy_timeout": f"{max(command_limit, data_limit)}s",
                    "smtpd_client_connection_count_limit": str(config.max_per_ip or 50),
                    # Postfix ends DATA only at <CR><LF>.<CR><LF> and turns bare LF into
                    # line ends, for every client (SMTP smuggling, CVE-2023-51764).
                    "smtpd_forbid_bare_newline": "normalize",
                    "smtpd_forbid_bare_newline_exclusions": "",
                },
            )
        )
    host = _postfix_host(config.next_hop_host)
    key = f"{host}:{config.next_hop_port}/inet"
    services.append(
        (
            key,
            f"{host}:{config.next_hop_port} inet n - n - - smtpd",
            {
                "content_filter": "",
                # Before the queue (proxy_filter) this smtpd is the only one that hands
                # mail to cleanup: header/body checks run here, once (SMTPD_PROXY_README).
                # After it (content_filter) they ran before the worker already.
                "receive_override_options": (
                    "no_unknown_recipient_checks"
                    if config.mode == "proxy_filter"
                    else "no_unknown_recipient_checks,no_header_body_checks,no_milters"
                ),
                "smtpd_client_restrictions": "permit_mynetworks,reject",
                "smtpd_helo_restrictions": "",
                "smtpd_sender_restrictions": "",
                "smtpd_relay_restrictions": "permit_mynetworks,reject",
                "smtpd_recipient_restrictions": "permit_mynetworks,reject",
                "smtpd_data_restrictions": "",
                "smtpd_end_of_data_restrictions": "",
                "mynetworks": peers,
                "smtpd_authorized_xforward_hosts": peers,
                "smtpd_milters": "",
                "local_recipient_maps": "",
                "relay_recipient_maps": "",
                "smtpd_error_sleep_time": "0",
                "smtpd_soft_error_limit": "1001",
                "smtpd_hard_error_limit": "1000",
                "smtpd_client_connection_count_limit": "0",
                "smtpd_client_connection_rate_limit": "0",
            },
        )
    )
    return PostfixSnippet(main=main, services=tuple(services))


def _postfix_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _postfix_next_hop(value: str) -> str:
    """`host`, `host:port`, `[host]` or `[host]:port` as a Postfix next hop: in brackets,
    so that Postfix delivers to that host rather than to the domain's MX hosts."""
    value = value.strip()
    if value.startswith("["):
        return value
    if value.count(":") == 1:
        host, port = value.split(":")
        return f"[{host}]:{port}"
    return f"[{value}]"


def _postfix_network(host: str) -> str:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    return f"[{ip}]/128" if ip.version == 6 else f"{ip}/32"
