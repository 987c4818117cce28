"""Bad-header findings, one per defect kind (security-tests cases 53-55, 58, 59, 63)."""

from __future__ import annotations

import pytest

from mailfilter.checks.headers import check_headers
from mailfilter.mime import parse_message

FROM = b"From: a@example.com\r\n"
DATE = b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
GOOD = FROM + DATE + b"Subject: hello\r\nTo: b@example.com\r\n"


def finding_names(raw: bytes) -> list[str]:
    findings = check_headers(parse_message(raw))
    assert all(finding.category == "BADH" for finding in findings)
    return [finding.name for finding in findings]


def test_a_well_formed_message_has_no_bad_header_findings():
    assert finding_names(GOOD + b"\r\nbody\r\n") == []


@pytest.mark.parametrize(
    ("headers", "name"),
    [
        (GOOD + "X-Name: Jürgen\r\n".encode(), "8bit-in-header"),
        (GOOD + b"X-Null: a\x00b\r\n", "nul-in-header"),
        (GOOD + b"Subject2: a\rBcc: victim@example.com\r\n", "bare-cr-in-header"),
        (GOOD + b"X-Fold: a\r\n   \r\n b\r\n", "whitespace-only-folded-line"),
        (GOOD + b"X-Long: " + b"a" * 1000 + b"\r\n", "header-line-too-long"),
        (GOOD + b"this is not a header\r\n", "header-syntax"),
        (GOOD + b": no name\r\n", "header-syntax"),
        (DATE + b"Subject: x\r\n", "missing-header"),
        (FROM + b"Subject: x\r\n", "missing-header"),
        (GOOD + b"From: c@example.com\r\n", "duplicate-header"),
        (GOOD + b"Subject: second\r\n", "duplicate-header"),
    ],
    ids=[
        "8bit",
        "nul",
        "bare-cr",
        "whitespace-fold",
        "long-line",
        "not-a-field",
        "empty-name",
        "no-from",
        "no-date",
        "two-from",
        "two-subject",
    ],
)
def test_each_bad_header_category_is_its_own_finding(headers, name):
    """Case 63: amavis' bad-header categories, each classified, none crashing."""
    assert name in finding_names(headers + b"\r\nbody\r\n")


def test_one_finding_per_kind_however_often_it_occurs():
    raw = GOOD + b"X-A: \xff\r\nX-B: \xfe\r\nX-C: \xfd\r\n\r\nbody"
    findings = check_headers(parse_message(raw))
    (finding,) = findings
    assert finding.name == "8bit-in-header"
    assert finding.detail.endswith("(and 2 more)")


def test_mime_defects_are_bad_header_findings_with_their_own_names():
    """Cases 53-55, 58, 59."""
    raw = (
        GOOD
        + b'Content-Type: multipart/mixed; boundary="AAA"; boundary="BBB"\r\n\r\n'
        + b"--AAA\r\nContent-Transfer-Encoding: base64\r\n\r\nTW!Fu\r\n"
        + b"--AAA\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n=ZZ\r\n"
    )
    names = finding_names(raw)
    for expected in (
        "duplicate-boundary",
        "invalid-base64-characters",
        "bad-quoted-printable",
        "missing-close-boundary",
    ):
        assert expected in names


def test_a_parse_failure_is_a_finding_not_an_exception():
    names = finding_names(GOOD + b"Content-Type: message/rfc822\r\n\r\n" * 80 + b"\r\nx")
    assert "too-deep" in names


UTF8_HEADERS = (
    "From: Jürgen Müller <jürgen@bücher.example>\r\n"
    "To: alice@example.test\r\n"
    "Subject: Grüße aus München\r\n"
).encode() + DATE


def test_utf8_headers_of_an_smtputf8_message_are_no_defect():
    """RFC 6532: with SMTPUTF8 a header field may carry UTF-8 as it is."""
    raw = UTF8_HEADERS + "\r\nGrüße\r\n".encode()
    assert check_headers(parse_message(raw), utf8_headers=True) == []
    assert finding_names(raw) == ["8bit-in-header"]


def test_latin1_headers_stay_a_defect_under_smtputf8():
    raw = UTF8_HEADERS + b"X-Note: caf\xe9\r\n\r\nbody\r\n"
    findings = check_headers(parse_message(raw), utf8_headers=True)
    assert [finding.name for finding in findings] == ["8bit-in-header"]


def test_a_latin1_body_does_not_make_utf8_headers_a_defect_under_smtputf8():
    raw = UTF8_HEADERS + b"Content-Type: text/plain; charset=iso-8859-1\r\n\r\ncaf\xe9\r\n"
    assert check_headers(parse_message(raw), utf8_headers=True) == []


def test_utf8_headers_of_smtputf8_mail_pass_the_worker_as_no_bad_header(start_filter, next_hop):
    """RFC 6532: with SMTPUTF8, UTF-8 in header fields is the message's right; the same
    octets without SMTPUTF8 stay a bad header."""
    import smtplib

    from mailfilter.interfaces import StaticRecipientLookup
    from mailfilter.policy import CheckPolicy
    from mailfilter.profiles import parse_profile

    worker = start_filter(
        policy=CheckPolicy(),
        lookup=StaticRecipientLookup(default=parse_profile("badh_destiny=reject\n", name="t")),
    )
    raw = ("From: Jürgen <jürgen@remote.example>\r\nTo: alice@example.test\r\n"
           "Date: Fri, 20 Nov 2026 10:00:00 +0000\r\nSubject: Grüße\r\n"
           "Message-ID: <utf8@remote.example>\r\n\r\nHallo.\r\n").encode()
    answers = []
    for options in (["SMTPUTF8", "BODY=8BITMIME"], ["BODY=8BITMIME"]):
        with smtplib.SMTP("127.0.0.1", worker.port, timeout=30) as client:
            client.ehlo("client.test")
            client.mail("sender@remote.example", options=options)
            assert client.rcpt("alice@example.test")[0] == 250
            answers.append(client.data(raw))
    assert answers[0][0] == 250, answers[0]
    assert answers[1][0] == 554 and b"8bit-in-header" in answers[1][1], answers[1]
