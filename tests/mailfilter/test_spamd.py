"""The spamd client against a real spamd, its failure policy, and the X-Spam-* headers.

Hostile-input case 37: spamd timing out, crashing or the message being too large gives a
defined result ("error" or "skipped"), which the policy delivers with
`X-Spam-Status: Unscanned, reason=...` instead of holding the mail back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from mailfilter.checks.spamd import (
    SpamdClient,
    SpamResult,
    parse_response,
    spam_findings,
    spam_headers,
    spam_level,
    spam_score,
    spam_status,
    unscanned_headers,
)
from tests.mailfilter.daemons import free_port, spamd_daemon, start_spamd, world_readable_tmp  # noqa: F401

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def message(body: bytes) -> bytes:
    return (
        b"From: Alice <alice@example.org>\r\nTo: bob@example.com\r\nSubject: lunch\r\n"
        b"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nMessage-ID: <lunch.42@example.org>\r\n"
        b"\r\n" + body + b"\r\n"
    )


def client(daemon, **options) -> SpamdClient:
    return SpamdClient(host=daemon.host, port=daemon.port, timeout=60, **options)


def check(spam_client: SpamdClient, data: bytes, **options) -> SpamResult:
    return asyncio.run(spam_client.check(data, **options))


# --- a real spamd -------------------------------------------------------------------------


def test_spamd_answers_ping(spamd):
    assert asyncio.run(client(spamd).ping()) is True


def test_gtube_is_spam_with_a_score_of_at_least_1000(spamd):
    result = check(client(spamd), message(b"Buy now.\r\n" + GTUBE))
    assert result.status == "scanned"
    assert result.score >= 1000 and result.required == 5
    assert "GTUBE" in result.tests


def test_a_normal_message_is_not_spam(spamd):
    result = check(client(spamd), message(b"See you at noon in the usual place?\r\n-- Alice"))
    assert result.status == "scanned"
    assert result.score < result.required
    assert "GTUBE" not in result.tests


def test_a_message_of_exactly_spam_max_size_is_scanned(spamd):
    data = message(GTUBE)
    assert check(client(spamd), data, max_size=len(data)).score >= 1000


def test_a_message_over_spam_max_size_is_skipped_without_asking_spamd(spamd):
    data = message(GTUBE)
    result = check(client(spamd), data, max_size=len(data) - 1)
    assert result.status == "skipped"
    assert result.score == 0 and result.tests == ()
    assert unscanned_headers(result) == [("X-Spam-Status", "Unscanned, reason=oversize")]


def test_a_message_of_half_a_megabyte_is_scanned(spamd):
    # SpamAssassin reads only the first 50 kB of a body part (body_part_scan_size).
    body = GTUBE + b"\r\n" + b"Plain words for a long report, line after line.\r\n" * 10_000
    result = check(client(spamd), message(body), max_size=524288 * 2)
    assert result.status == "scanned" and result.score >= 1000


# --- spamd down or misbehaving --------------------------------------------------------------


def test_a_spamd_that_was_stopped_gives_an_error():
    with world_readable_tmp("spamd-stopped-") as directory:
        daemon = start_spamd(directory)
        try:
            assert check(client(daemon), message(GTUBE)).score >= 1000
        finally:
            daemon.stop()
        assert check(client(daemon), message(GTUBE)).status == "error"


def test_spamd_not_listening_is_an_error_marked_unscanned():
    result = check(SpamdClient(port=free_port(), timeout=5), message(GTUBE))
    assert result.status == "error" and "unreachable" in result.reason
    assert unscanned_headers(result) == [("X-Spam-Status", "Unscanned, reason=error")]


def test_ping_is_false_when_spamd_is_down():
    assert asyncio.run(SpamdClient(port=free_port(), timeout=5).ping()) is False


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def fake_spamd(reply: bytes, *, hang: bool = False) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read()  # the client shuts down its side after the message
            writer.write(reply)
            await writer.drain()
            if hang:
                await asyncio.sleep(30)
        finally:
            writer.close()

    return handle


async def _check_against(handler: Handler, timeout: float = 5) -> SpamResult:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        return await SpamdClient(port=port, timeout=timeout).check(message(GTUBE))
    finally:
        server.close()
        await server.wait_closed()


def test_a_spamd_that_hangs_times_out_as_an_error():
    result = asyncio.run(_check_against(fake_spamd(b"", hang=True), timeout=0.5))
    assert result.status == "error" and "timed out" in result.reason


@pytest.mark.parametrize(
    "reply",
    [
        b"",  # crashed: closed without a word
        b"SPAMD/1.0 76 Bad header line: SYMBOLS SPAMC/1.5\r\n",
        b"SPAMD/1.1 0 EX_OK\r\nSpam: maybe\r\n\r\n",
        b"SPAMD/1.1 0 EX_OK\r\nContent-length: 50\r\nSpam: True ; 1000.0 / 5.0\r\n\r\nGTUBE",
        b"HTTP/1.1 200 OK\r\n\r\n",
        b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 1000.0 / 5.0\r\n",
    ],
)
def test_a_spamd_answering_nonsense_is_an_error(reply):
    assert asyncio.run(_check_against(fake_spamd(reply))).status == "error"


def test_an_endless_answer_is_an_error_not_a_hang():
    reply = b"SPAMD/1.1 0 EX_OK\r\n" + b"X" * 200_000
    assert asyncio.run(_check_against(fake_spamd(reply, hang=True))).status == "error"


def test_response_parsing_reads_score_required_and_tests():
    result = parse_response(
        b"SPAMD/1.1 0 EX_OK\r\nContent-length: 21\r\nSpam: False ; -0.0 / 5.0\r\n\r\n"
        b"NO_RECEIVED,NO_RELAYS"
    )
    assert (result.status, result.score, result.required) == ("scanned", 0.0, 5.0)
    assert result.tests == ("NO_RECEIVED", "NO_RELAYS")


def test_test_names_with_odd_characters_are_dropped():
    result = parse_response(
        b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 7.5 / 5.0\r\n\r\nGOOD_ONE,bad\r\nX-Injected: 1,OK"
    )
    assert result.tests == ("GOOD_ONE", "OK")


def test_a_scanned_score_counts_times_the_profiles_weight():
    result = SpamResult(status="scanned", score=8.0, required=5.0, tests=("A", "B"))
    findings = spam_findings(result, weight=0.5)
    assert [(f.category, f.name, f.score) for f in findings] == [("SPAM", "spamassassin", 4.0)]
    assert "tests=A,B" in findings[0].detail
    assert spam_findings(result, weight=0) == []


def test_an_unscanned_message_gets_no_spamassassin_score():
    assert spam_findings(SpamResult(status="error", reason="down"), weight=1) == []
    assert spam_findings(SpamResult(status="skipped", reason="big"), weight=1) == []


# --- headers --------------------------------------------------------------------------------


def test_spam_headers_follow_spamassassins_layout():
    headers = dict(
        spam_headers(is_spam=True, score=1003.3, required=5.0, tests=("GTUBE", "NO_RELAYS"))
    )
    assert headers["X-Spam-Status"] == "Yes, score=1003.3 required=5.0 tests=GTUBE,NO_RELAYS"
    assert headers["X-Spam-Level"] == "*" * 50
    assert headers["X-Spam-Score"] == "1003.300"


def test_spam_level_has_one_star_per_whole_point_and_none_below_one():
    assert spam_level(6.9) == "******"
    assert spam_level(0.9) == "" and spam_level(-3) == ""
    assert spam_score(-0.5) == "-0.500"


def test_a_long_test_list_is_folded_within_78_columns():
    tests = [f"SOME_LONG_RULE_NAME_{n}" for n in range(20)]
    value = spam_status(is_spam=False, score=2.0, required=5.0, tests=tests)
    lines = f"X-Spam-Status: {value}".split("\r\n")
    assert len(lines) > 1 and all(len(line) <= 78 for line in lines)
    assert all(line.startswith("\t") for line in lines[1:])
    assert value.replace("\r\n\t", "").endswith(",".join(tests))


def test_a_status_is_folded_only_past_78_columns():
    # "X-Spam-Status: No, score=2.0 required=5.0 tests=" is 48 columns.
    fits = spam_status(is_spam=False, score=2.0, required=5.0, tests=["A" * 30])
    assert len(f"X-Spam-Status: {fits}") == 78 and "\r\n" not in fits
    folded = spam_status(is_spam=False, score=2.0, required=5.0, tests=["A" * 31])
    assert folded == "No, score=2.0 required=5.0\r\n\ttests=" + "A" * 31
