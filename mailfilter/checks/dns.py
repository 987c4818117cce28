"""The DNS checks of a profile: dnsbl, dnsbl_domain, rdns_required and rmx_required.

    checker = DnsChecker(nameservers=["127.0.0.1:53"], timeout=2.0, lifetime=4.0)
    lookups = checker.start(profile, client_ip="192.0.2.7", sender="a@example.org",
                            from_domains=())          # at MAIL/RCPT time: queries start now
    lookups.add_from_domains(["example.net"])         # after DATA, the From domains
    findings = await lookups.findings()               # SPAM findings, one per rule that hit
    lookups.errors                                    # what could not be decided (statistics)
    lookups.skipped                                   # what was not asked, and why

Every query is a task started by `start` (or `add_from_domains`), so the answers arrive
while the client is still sending; `findings` waits for them at most until `lifetime`
seconds after they were started, cancels what is still running and counts it as a
timeout. The same query is sent once even when several lines of the profile need it
(Medium asks zen.spamhaus.org for four different answers).

A DNS failure never makes a finding. A timeout, SERVFAIL or REFUSED, a block list whose own
zone does not exist, or an answer that a list uses to signal an error leaves the rule
undecided: no finding, and a `DnsError` in `DnsLookups.errors` (one per query).

What each variable does (messagewall_profiles(5); where the man page is silent, ours):

dnsbl=score,zone[/answer]
    The client address is looked up as `<reversed address>.<zone>` (IPv4: the octets in
    reverse order, `7.2.0.192.zone`; IPv6: the 32 nibbles in reverse order; an IPv4-mapped
    IPv6 address counts as IPv4). The line hits when the A answer contains `answer`, or,
    when the line names none, any address in 127.0.0.0/8 (RFC 5782); a named `answer`
    outside 127.0.0.0/8 or in 127.255.255.0/24 never hits. Answers in
    127.255.255.0/24 are the error codes lists send to queries they refuse (Spamhaus sends
    them to large public resolvers) and answers outside 127.0.0.0/8 are a resolver that
    rewrites NXDOMAIN: both are counted as errors and never hit on their own.
dnsbl_domain=score,zone[/answer]
    The same for domains, looked up as `<domain>.<zone>`: the envelope sender's domain (the
    man page's "reverse path domain"), and the domains of the From header that the caller
    passes (our addition: pass none for MessageWall's behaviour). One finding per line,
    naming every listed domain. The null sender and address literals are not looked up.
rdns_required=score,1
    The client address must have a PTR record. The man page asks for reverse DNS only, so
    the name is not forward-confirmed (its A/AAAA records are not compared with the
    client). NXDOMAIN or an empty answer is a miss.
rmx_required=score,1
    The envelope sender's domain must have an MX record, or else an A record as the man
    page says; an AAAA record counts as well (RFC 5321 5.1 delivers to it). A domain that
    does not exist misses, and so does a null MX (RFC 7505: "this domain takes no mail"),
    since return mail could not be delivered. The null sender is skipped.

A list whose zone does not exist answers NXDOMAIN with the SOA of a zone above it; such an
answer is an error ("list zone does not exist"), not a miss. A list that is a name inside
its parent's zone rather than a zone of its own looks the same, and is then counted as an
error on each miss (its hits still count).

Internal clients are never looked up (ours: the man page says nothing of them).
Behind Postfix the client is whatever host sent the mail: the local pickup, the webmail,
hosts of the internal network. A client in one of INTERNAL_NETWORKS (0.0.0.0/8 with the
unspecified address, loopback, RFC 1918, the carrier-grade NAT space 100.64.0.0/10,
link-local, multicast, IPv6 unique-local fc00::/7, and these as IPv4-mapped IPv6
addresses) asks nothing of dnsbl and rdns_required: asking would tell the list's operator
about the internal network and cost query time, and some lists list private ranges (a
policy list can answer 127.0.0.10 for them), which would score the internal mail. Those
lines count as not listed, with no score; `DnsLookups.skipped` says so, and nothing is
counted as a DNS error. The sender's domain is still looked up (dnsbl_domain,
rmx_required). The documentation ranges (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24,
2001:db8::/32), which Python counts as private, are not internal here: they are looked
up like any internet address.

Domains are asked as DNS knows them: an internationalized domain (SMTPUTF8 mail) as IDNA
2008 A-labels, the way Postfix and the registries write them (`straße.example` is
`xn--strae-oqa.example`; IDNA 2003 would ask for `strasse.example`, another domain).
Findings name the A-label form.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from email.utils import getaddresses

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdatatype
import dns.resolver
import idna

from mailfilter.findings import Finding
from mailfilter.profiles import DnsList, Profile, Scored

log = logging.getLogger(__name__)

LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")
ERROR_CODES = ipaddress.IPv4Network("127.255.255.0/24")
# A From header may name many addresses; only so many domains are looked up per list.
MAX_FROM_DOMAINS = 10
# Clients that are not looked up in block lists or for reverse DNS (see the module
# docstring). Listed one by one: ipaddress's is_private also covers the documentation
# ranges, which are internet clients here.
INTERNAL_NETWORKS: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = tuple(
    ipaddress.ip_network(text)
    for text in (
        "0.0.0.0/8",  # "this network", with the unspecified address 0.0.0.0
        "10.0.0.0/8",  # RFC 1918
        "100.64.0.0/10",  # shared address space, carrier-grade NAT (RFC 6598)
        "127.0.0.0/8",  # loopback
        "169.254.0.0/16",  # link-local
        "172.16.0.0/12",  # RFC 1918
        "192.168.0.0/16",  # RFC 1918
        "224.0.0.0/4",  # multicast
        "::/128",  # unspecified
        "::1/128",  # loopback
        "fc00::/7",  # unique local (RFC 4193)
        "fe80::/10",  # link-local
        "ff00::/8",  # multicast
    )
)


@dataclass(frozen=True)
class DnsError:
    """A query whose answer decided nothing: `check` is the profile variable."""

    check: str
    query: str
    reason: str


@dataclass(frozen=True)
class _Result:
    """What a query found: its values (addresses, names); `error` when it decided nothing."""

    values: tuple = ()
    error: str | None = None


@dataclass
class _Query:
    check: str
    text: str
    task: asyncio.Task[_Result]
    deadline: float
    result: _Result | None = None


def client_ip_address(client_ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address of a client as the checks get it; an IPv4-mapped IPv6 address is IPv4.

    Accepts `IPv6:` prefixes (XFORWARD), brackets and zone indexes; None when it is not an
    address (`[UNAVAILABLE]`, `unknown`).
    """
    text = client_ip.strip().strip("[]")
    if text[:5].lower() == "ipv6:":
        text = text[5:]
    text = text.split("%", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def internal_network(client_ip: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """The one of INTERNAL_NETWORKS that holds the client, None for an internet client."""
    address = client_ip_address(client_ip)
    return None if address is None else _internal(address)


def _internal(address: ipaddress.IPv4Address | ipaddress.IPv6Address):
    return next((net for net in INTERNAL_NETWORKS if address in net), None)


def _reversed(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> tuple[str, str]:
    if isinstance(address, ipaddress.IPv4Address):
        return ".".join(reversed(str(address).split("."))), "in-addr.arpa"
    return ".".join(reversed(address.exploded.replace(":", ""))), "ip6.arpa"


def reversed_address(client_ip: str) -> tuple[str, str] | None:
    """(`7.2.0.192`, `in-addr.arpa`) for 192.0.2.7; nibbles and `ip6.arpa` for IPv6.

    Accepts what client_ip_address does; None when it is not an address.
    """
    address = client_ip_address(client_ip)
    return None if address is None else _reversed(address)


def sender_domain(sender: str | None) -> str | None:
    """The domain of an envelope sender; None for the null sender and address literals."""
    if not sender:
        return None
    address = sender.strip().strip("<>")
    local, at, domain = address.rpartition("@")
    if not at or not local:
        return None
    return _domain(domain)


def _a_labels(domain: str) -> str:
    """An internationalized domain as IDNA 2008 A-labels: `straße.example` to
    `xn--strae-oqa.example` (UTS 46 non-transitional: compatibility forms and case are
    folded, but ß, ς and the joiners are kept, as Postfix and the registries do). Raises
    idna.IDNAError for a name IDNA 2008 does not allow."""
    if domain.isascii():
        return domain.lower()
    return idna.encode(domain, uts46=True, transitional=False).decode("ascii")


def _domain(text: str) -> str | None:
    try:
        domain = _a_labels(text.strip()).rstrip(".")
    except idna.IDNAError:
        return None
    if not domain or domain.startswith("[") or "." not in domain:
        return None
    try:
        dns.name.from_text(domain)  # labels and length must be valid
    except (dns.exception.DNSException, ValueError, UnicodeError):
        return None
    return domain


def _name(*parts: str) -> dns.name.Name:
    return dns.name.from_text(".".join(parts) + ".")


def parse_nameserver(text: str, port: int = 53) -> tuple[str, int]:
    """`ip`, `ip:port`, `[v6]:port` or a bare IPv6 address to (address, port)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest.startswith(":"):
            port = int(rest[1:])
        elif rest:
            raise ValueError(f"bad name server {text!r}")
    elif text.count(":") == 1:
        host, _, number = text.partition(":")
        port = int(number)
    else:
        host = text
    ipaddress.ip_address(host)
    if not 0 < port < 65536:
        raise ValueError(f"bad port in {text!r}")
    return host, port


class DnsChecker:
    """One resolver, shared by every message of the worker (with a cache of answers).

    `nameservers`: addresses as `ip`, `ip:port`, `[v6]:port` or (ip, port) pairs; None uses
    the system's resolver configuration (/etc/resolv.conf). `port` is the port of entries
    that name none. `timeout` is how long one server is waited for before it is asked
    again or the next one is; `lifetime` bounds all the queries of one message.
    """

    def __init__(
        self,
        *,
        nameservers: Sequence[str | tuple[str, int]] | None = None,
        port: int = 53,
        timeout: float = 2.0,
        lifetime: float = 4.0,
        cache_size: int = 10000,
    ) -> None:
        if timeout <= 0 or lifetime <= 0:
            raise ValueError("timeout and lifetime must be positive")
        if nameservers is None:
            try:
                resolver = dns.asyncresolver.Resolver(configure=True)
            except dns.resolver.NoResolverConfiguration:
                resolver = dns.asyncresolver.Resolver(configure=False)
                resolver.nameservers = ["127.0.0.1"]
            resolver.port = port
        else:
            servers = []
            for entry in nameservers:
                host, server_port = (
                    parse_nameserver(entry, port) if isinstance(entry, str) else entry
                )
                servers.append(dns.nameserver.Do53Nameserver(host, server_port))
            if not servers:
                raise ValueError("no name servers")
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = servers
        resolver.search = []
        resolver.timeout = timeout
        resolver.lifetime = lifetime
        if cache_size > 0:
            resolver.cache = dns.resolver.LRUCache(cache_size)
        self.resolver = resolver
        self.timeout = timeout
        self.lifetime = lifetime

    def start(
        self,
        profile: Profile,
        *,
        client_ip: str | None,
        sender: str | None,
        from_domains: Iterable[str] = (),
    ) -> DnsLookups:
        """Start every query the profile needs; must be called inside the event loop."""
        lookups = DnsLookups(self, profile)
        address = client_ip_address(client_ip) if client_ip else None
        if address is not None:
            internal = _internal(address)
            if internal is None:
                lookups._client(_reversed(address), client_ip or "")
            elif profile.dnsbl or profile.rdns_required.value:
                lookups._skip(
                    f"client {client_ip} is in {internal}, an internal network: "
                    "not looked up in block lists or for reverse DNS"
                )
        domain = sender_domain(sender)
        if domain is not None:
            lookups._sender(domain)
        lookups.add_from_domains(from_domains)
        return lookups

    async def _resolve(self, qname: dns.name.Name, rdtype: str, deadline: float):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise dns.resolver.LifetimeTimeout(timeout=self.lifetime, errors=[])
        return await self.resolver.resolve(
            qname, rdtype, search=False, raise_on_no_answer=False, lifetime=remaining
        )


@dataclass
class _Rule:
    """One profile line and how to tell from its queries' results whether it hit."""

    check: str
    score: float
    queries: list[tuple[str, _Query]]  # (what was looked up, the query)
    hit: Callable[[_Result], bool]
    describe: Callable[[list[str]], str]


@dataclass
class DnsLookups:
    """The queries of one transaction; `findings()` collects them, `cancel()` drops them."""

    checker: DnsChecker
    profile: Profile
    errors: list[DnsError] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    _queries: dict[tuple[str, str], _Query] = field(default_factory=dict)
    _rules: list[_Rule] = field(default_factory=list)
    _domain_rules: dict[int, _Rule] = field(default_factory=dict)
    _domains: set[str] = field(default_factory=set)
    _from_count: int = 0
    _findings: list[Finding] | None = None

    # -- starting -------------------------------------------------------------------------

    def _query(self, check: str, text: str, make: Callable[[float], object]) -> _Query:
        key = (check, text)
        query = self._queries.get(key)
        if query is None:
            deadline = time.monotonic() + self.checker.lifetime
            task = asyncio.get_running_loop().create_task(_guard(make(deadline)))
            query = _Query(check=check, text=text, task=task, deadline=deadline)
            self._queries[key] = query
        return query

    def _skip(self, reason: str) -> None:
        """Lines left unasked on purpose: they count as not listed, and as no error."""
        self.skipped.append(reason)
        log.debug("DNS %s", reason)

    def _client(self, reversed_ip: tuple[str, str], client_ip: str) -> None:
        labels, arpa = reversed_ip
        for line in self.profile.dnsbl:
            query = self._list_query("dnsbl", labels, line.value)
            if query is None:
                continue
            self._rules.append(
                _Rule(
                    "dnsbl",
                    line.score,
                    [(client_ip, query)],
                    _list_hit(line.value),
                    _list_detail(line),
                )
            )
        rdns = self.profile.rdns_required
        if rdns.value:
            text = f"{labels}.{arpa}"
            query = self._query("rdns_required", f"{text} PTR", lambda d: self._ptr(text, d))
            self._rules.append(
                _Rule(
                    "rdns_required",
                    rdns.score,
                    [(client_ip, query)],
                    lambda result: result.error is None and not result.values,
                    lambda items: f"no reverse DNS (PTR) for {', '.join(items)}",
                )
            )

    def _sender(self, domain: str) -> None:
        rmx = self.profile.rmx_required
        if rmx.value:
            query = self._query("rmx_required", f"{domain} MX", lambda d: self._mx(domain, d))
            self._rules.append(
                _Rule(
                    "rmx_required",
                    rmx.score,
                    [(domain, query)],
                    lambda result: result.error is None and not result.values,
                    lambda items: f"sender domain {', '.join(items)} has no MX, A or AAAA record",
                )
            )
        self._add_domain(domain)

    def add_from_domains(self, domains: Iterable[str]) -> None:
        """Look up more domains (the From header's) in the dnsbl_domain lists."""
        for text in domains:
            domain = _domain(text)
            if domain is None or domain in self._domains:
                continue
            if self._from_count >= MAX_FROM_DOMAINS:
                break
            self._from_count += 1
            self._add_domain(domain)

    def _add_domain(self, domain: str) -> None:
        if domain in self._domains:
            return
        self._domains.add(domain)
        for index, line in enumerate(self.profile.dnsbl_domain):
            query = self._list_query("dnsbl_domain", domain, line.value)
            if query is None:
                continue
            rule = self._domain_rules.get(index)
            if rule is None:
                rule = _Rule(
                    "dnsbl_domain", line.score, [], _list_hit(line.value), _list_detail(line)
                )
                self._domain_rules[index] = rule
                self._rules.append(rule)
            rule.queries.append((domain, query))

    def _list_query(self, check: str, labels: str, listing: DnsList) -> _Query | None:
        try:
            qname = _name(labels, listing.zone)
        except (dns.exception.DNSException, ValueError, UnicodeError):
            return None  # too long a name: nothing that can be asked
        return self._query(
            check, f"{qname.to_text(omit_final_dot=True)} A",
            lambda deadline: self._list(qname, listing.zone, deadline),
        )

    # -- the queries (each runs as one task) ----------------------------------------------

    async def _list(self, qname: dns.name.Name, zone: str, deadline: float) -> _Result:
        try:
            answer = await self.checker._resolve(qname, "A", deadline)
        except dns.resolver.NXDOMAIN as error:
            if _zone_missing(error, _name(zone)):
                return _Result(error="list zone does not exist")
            return _Result()
        addresses = tuple(
            ipaddress.IPv4Address(rdata.address) for rdata in (answer.rrset or ())
        )
        odd = [a for a in addresses if a in ERROR_CODES or a not in LOOPBACK]
        if odd:
            shown = ", ".join(str(a) for a in odd)
            if any(a in ERROR_CODES for a in odd):
                return _Result(addresses, f"list answered an error code ({shown})")
            return _Result(addresses, f"answer outside 127.0.0.0/8 ({shown})")
        return _Result(addresses)

    async def _ptr(self, text: str, deadline: float) -> _Result:
        try:
            answer = await self.checker._resolve(_name(text), "PTR", deadline)
        except dns.resolver.NXDOMAIN:
            return _Result()
        return _Result(tuple(rdata.target.to_text() for rdata in (answer.rrset or ())))

    async def _mx(self, domain: str, deadline: float) -> _Result:
        qname = _name(domain)
        try:
            answer = await self.checker._resolve(qname, "MX", deadline)
        except dns.resolver.NXDOMAIN:
            return _Result()
        if answer.rrset:
            exchanges = [(rdata.preference, rdata.exchange) for rdata in answer.rrset]
            if len(exchanges) == 1 and exchanges[0][1] == dns.name.root:
                return _Result()  # null MX, RFC 7505
            return _Result(tuple(f"MX {name}" for _, name in exchanges))
        # No MX: the address records are the implicit MX (RFC 5321 5.1).
        results = await asyncio.gather(
            _guard(self._address(qname, "A", deadline)),
            _guard(self._address(qname, "AAAA", deadline)),
        )
        values = tuple(value for result in results for value in result.values)
        if values:
            return _Result(values)
        failed = [result.error for result in results if result.error]
        return _Result(error=failed[0]) if failed else _Result()

    async def _address(self, qname: dns.name.Name, rdtype: str, deadline: float) -> _Result:
        try:
            answer = await self.checker._resolve(qname, rdtype, deadline)
        except dns.resolver.NXDOMAIN:
            return _Result()
        return _Result(tuple(f"{rdtype} {rdata.address}" for rdata in (answer.rrset or ())))

    # -- collecting -----------------------------------------------------------------------

    async def findings(self) -> list[Finding]:
        """Wait for the answers (not beyond the lifetime) and judge every rule once."""
        if self._findings is not None:
            return list(self._findings)
        queries = list(self._queries.values())
        pending = {query.task for query in queries if not query.task.done()}
        if pending:
            latest = max(query.deadline for query in queries)
            # A little past the deadline so that the resolver's own timeout can end a query.
            wait = max(0.0, latest - time.monotonic()) + 0.05
            await asyncio.wait(pending, timeout=wait)
        late = []
        for query in queries:
            if query.task.cancelled():
                query.result = _Result(error="cancelled")
            elif query.task.done():
                query.result = query.task.result()
            else:
                query.task.cancel()
                late.append(query.task)
                query.result = _Result(error="timeout")
            if query.result.error:
                self.errors.append(DnsError(query.check, query.text, query.result.error))
                log.debug("DNS %s %s: %s", query.check, query.text, query.result.error)
        if late:
            await asyncio.wait(late, timeout=0.5)
        findings = []
        for rule in self._rules:
            items = [
                what for what, query in rule.queries if query.result and rule.hit(query.result)
            ]
            if items:
                findings.append(Finding("SPAM", rule.check, rule.score, rule.describe(items)))
        self._findings = findings
        return list(findings)

    def cancel(self) -> None:
        """Drop the queries still running (the transaction ended without a message)."""
        for query in self._queries.values():
            query.task.cancel()


async def _guard(coroutine) -> _Result:
    """Run one query; every failure becomes an undecided result, never an exception."""
    try:
        return await coroutine
    except dns.resolver.LifetimeTimeout:
        return _Result(error="timeout")
    except dns.resolver.NoNameservers as error:
        return _Result(error=_no_nameservers(error))
    except dns.exception.Timeout:
        return _Result(error="timeout")
    except dns.exception.DNSException as error:
        return _Result(error=f"{type(error).__name__}: {error}"[:200])
    except OSError as error:
        return _Result(error=f"network error: {error.strerror or error}")
    except asyncio.CancelledError:
        raise
    except Exception as error:  # a DNS check must never fail the message
        log.warning("DNS query failed unexpectedly", exc_info=True)
        return _Result(error=f"unexpected error: {type(error).__name__}")


def _no_nameservers(error: dns.resolver.NoNameservers) -> str:
    """'SERVFAIL', 'REFUSED'... from the answers the servers gave."""
    codes = []
    for item in error.kwargs.get("errors", []):
        answer = item[-1]
        if hasattr(answer, "rcode"):
            codes.append(dns.rcode.to_text(answer.rcode()))
        else:
            codes.append(type(answer).__name__)
    return "no server answered" + (f" ({', '.join(sorted(set(codes)))})" if codes else "")


def _zone_missing(error: dns.resolver.NXDOMAIN, zone: dns.name.Name) -> bool:
    """True when the NXDOMAIN's SOA belongs to a zone above the list's own."""
    for response in error.kwargs.get("responses", {}).values():
        for rrset in getattr(response, "authority", ()):
            if rrset.rdtype == dns.rdatatype.SOA:
                return rrset.name != zone and zone.is_subdomain(rrset.name)
    return False


def _list_hit(listing: DnsList) -> Callable[[_Result], bool]:
    def hit(result: _Result) -> bool:
        if listing.answer is not None:
            # An answer outside 127.0.0.0/8 (a wildcard or a rewriting resolver) or an
            # error code is never a listing, even when the line names it.
            listed = listing.answer in LOOPBACK and listing.answer not in ERROR_CODES
            return listed and listing.answer in result.values
        return any(a in LOOPBACK and a not in ERROR_CODES for a in result.values)

    return hit


def _list_detail(line: Scored[DnsList]) -> Callable[[list[str]], str]:
    listing = line.value
    answer = f" ({listing.answer})" if listing.answer is not None else ""

    def describe(items: list[str]) -> str:
        return f"{', '.join(items)} listed in {listing.zone}{answer}"

    return describe


def uses_dns(profile: Profile) -> bool:
    """Whether a profile has any DNS check."""
    return bool(
        profile.dnsbl or profile.dnsbl_domain or profile.rdns_required.value
        or profile.rmx_required.value
    )


class DnsHook:
    """The policy's `dns_checks` hook: `(parsed, envelope, profile) -> SPAM findings`.

    The From header's domains are looked up as well as the envelope sender's. `on_error`
    is called with each DnsError (timeouts, SERVFAIL...), which never add a score.

    `prepare(envelope, profile)` starts the queries of the client address and the envelope
    sender as soon as both are known (at the first accepted RCPT) and returns them, or
    None when the profile has no DNS check; given back to the call as `lookups`, only the
    From header's domains are added then.
    """

    def __init__(self, checker: DnsChecker, *, on_error=None) -> None:
        self.checker = checker
        self.on_error = on_error

    def prepare(self, envelope, profile: Profile) -> DnsLookups | None:
        if not uses_dns(profile):
            return None
        return self.checker.start(
            profile, client_ip=envelope.client_address or None, sender=envelope.sender
        )

    async def __call__(
        self, parsed, envelope, profile: Profile, lookups: DnsLookups | None = None
    ) -> list[Finding]:
        if lookups is None:
            lookups = self.prepare(envelope, profile)
            if lookups is None:
                return []
        from_domains = []
        for value in parsed.header_all("From")[:5]:
            for _name, address in getaddresses([value]):
                domain = sender_domain(address)
                if domain:
                    from_domains.append(domain)
        lookups.add_from_domains(from_domains)
        findings = await lookups.findings()
        if self.on_error is not None:
            for error in lookups.errors:
                self.on_error(error)
        return findings


def policy_hook(checker: DnsChecker, *, on_error=None) -> DnsHook:
    """The policy's `dns_checks` hook (see DnsHook)."""
    return DnsHook(checker, on_error=on_error)
