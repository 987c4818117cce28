"""Each destiny of each category through the real worker: an aiosmtpd next hop, the Django
quarantine sink (files and index rows) and the SMTP replies amavisd-new gives."""

from __future__ import annotations

import smtplib

import pytest

from mailfilter.checks.clamd import ClamdClient
from mailfilter.config import FilterConfig
from mailfilter.interfaces import StaticRecipientLookup
from mailfilter.policy import CheckPolicy, FilterChecks
from mailfilter.profiles import BUILTIN_SIGNATURES, parse_profile
from quarantine.models import Message
from quarantine.sink import DjangoQuarantineSink
from quarantine.store import FileStore
from tests.mailfilter.daemons import eicar, free_port
from tests.mailfilter.test_policy import message

SIGS = BUILTIN_SIGNATURES / "default.sigs"
EXE = ("setup.exe", b"MZ" + b"\0" * 200, "application/octet-stream")

CASES = {
    "VIRUS": (f"virus_scan=1,{SIGS}\n", message("see " + eicar().decode() + "\n")),
    "BANNED": ("filename_reject=1,.exe\n", message(attachments=(EXE,))),
    "SPAM": ("reject_score=2\nbody_rejecti=2,special offer\nsubject_tag=[SPAM]\n",
             message("A special offer")),
    "BADH": ("", message().replace(b"Subject: hello", b"Subject: caf\xc3\xa9")),
}
# What the viewer's reasons show for each category.
REASON = {"VIRUS": "virus: Eicar", "BANNED": "banned: ", "SPAM": "tests: body_rejecti",
          "BADH": "bad header: 8bit-in-header"}
SUMMARY = {"VIRUS": b"INFECTED: Eicar", "BANNED": b"BANNED: ", "SPAM": b"- spam",
           "BADH": b"BAD HEADER: 8bit-in-header"}


def send(port: int, raw: bytes, recipients=("alice@example.test",)) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.ehlo("client.test")
        client.mail("sender@remote.example")
        for recipient in recipients:
            assert client.rcpt(recipient)[0] == 250
        return client.data(raw)


@pytest.fixture
def worker_for(start_filter, quarantine_dir):
    def start(profile_text: str):
        prof = parse_profile(profile_text or "reject=0\n", name="test")
        return start_filter(
            sink=DjangoQuarantineSink(FileStore(quarantine_dir)),
            policy=CheckPolicy(),
            lookup=StaticRecipientLookup(default=prof),
        )

    return start


@pytest.mark.parametrize("category", list(CASES))
@pytest.mark.parametrize("destiny", ["pass", "discard", "bounce", "reject"])
def test_each_destiny_of_each_category(transactional_db, worker_for, next_hop, quarantine_dir,
                                       category, destiny):
    text, raw = CASES[category]
    worker = worker_for(text + f"{category.lower()}_destiny={destiny}\n")
    code, reply = send(worker.port, raw)
    if destiny == "pass":
        assert code == 250, reply
        [delivery] = next_hop.deliveries
        assert b"\r\nX-Virus-Scanned: spamviewer\r\n" in delivery.content
        assert b"\r\nX-Spam-Status: " in delivery.content
        if category == "SPAM":
            assert b"\r\nSubject: [SPAM] hello\r\n" in delivery.content
        else:
            assert b"X-Amavis-Alert: " in delivery.content
        assert Message.objects.count() == 0
        return
    assert next_hop.deliveries == []
    # amavisd-new's enhanced codes: 8-bit data in a header is 6.3, anything else 7.0.
    detail = b"6.3" if category == "BADH" else b"7.0"
    if destiny == "reject":
        assert code == 554 and reply.startswith(b"5." + detail + b" Rejected: "), reply
        assert Message.objects.count() == 0
        assert [p for p in quarantine_dir.rglob("*") if p.is_file()] == []
        return
    if destiny == "discard":
        assert code == 250 and reply.startswith(b"2." + detail + b" Ok, discarded, id="), reply
    else:
        assert code == 554 and reply.startswith(b"5." + detail + b" Bounce, id="), reply
    assert SUMMARY[category] in reply
    mail_id = reply.split(b"id=")[1].split()[0].decode()
    held = Message.objects.get(mail_id=mail_id)
    assert held.category == category
    assert REASON[category] in held.reasons, held.reasons
    if category == "BANNED":
        assert "setup.exe" in held.reasons
    assert worker.stat("messages_quarantined", category) == 1


def test_clamd_down_gets_451_and_nothing_is_kept_or_delivered(
    transactional_db, start_filter, next_hop, quarantine_dir
):
    worker = start_filter(
        sink=DjangoQuarantineSink(FileStore(quarantine_dir)),
        policy=CheckPolicy(clamd=ClamdClient(port=free_port(), timeout=2)),
    )
    code, reply = send(worker.port, message())
    assert code == 451 and b"virus_scan" in reply
    assert next_hop.deliveries == [] and Message.objects.count() == 0
    assert worker.stat("messages_tempfailed", "virus_scan") == 1


def test_a_recipient_with_another_profile_is_sent_separately(start_filter, next_hop, tmp_path):
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    for name in ("Medium", "Relay", "Strict"):
        (profiles / name).write_text("reject_score=5\n")
    special = tmp_path / "special"
    special.write_text("boss@example.test Strict\n")
    checks = FilterChecks(FilterConfig(profile_dir=str(profiles), special_users=str(special)))
    worker = start_filter(policy=checks.policy, lookup=checks.lookup)
    with smtplib.SMTP("127.0.0.1", worker.port) as client:
        client.ehlo("client.test")
        client.mail("sender@remote.example")
        assert client.rcpt("alice@example.test")[0] == 250
        assert client.rcpt("bob@example.test")[0] == 250
        code, text = client.rcpt("boss@example.test")
        assert code == 451 and text.startswith(b"4.5.3 ") and b"send it separately" in text
        assert client.data(message())[0] == 250
    assert next_hop.deliveries[0].recipients == ["alice@example.test", "bob@example.test"]


def test_relay_clients_named_by_xforward_get_the_relay_profile(start_filter, next_hop, raw):
    seen = []

    class Recording(CheckPolicy):
        async def decide(self, message, envelope, profile):
            seen.append((envelope.relay_client, profile.name))
            return await super().decide(message, envelope, profile)

    checks = FilterChecks(FilterConfig())
    worker = start_filter(policy=Recording(), lookup=checks.lookup, relay_ips=("10.0.0.0/8",))
    for address in ("10.1.2.3", "192.0.2.1"):
        client = raw(worker.port)
        client.reply()
        client.command(b"EHLO postfix.test")
        assert client.command(b"XFORWARD ADDR=" + address.encode())[:3] == b"250"
        client.command(b"MAIL FROM:<user@ourdomain.test>")
        client.command(b"RCPT TO:<someone@elsewhere.example>")
        client.command(b"DATA")
        assert client.command(message() + b".")[:3] == b"250"
    assert seen == [(True, "relay"), (False, "default")]


def test_a_bad_header_other_than_8bit_is_refused_with_a_media_error_code(
    transactional_db, worker_for, next_hop, quarantine_dir
):
    worker = worker_for("badh_destiny=reject\n")
    raw = message().replace(b"Subject: hello", b"Subject: hello\r\nSubject: twice")
    code, reply = send(worker.port, raw)
    assert code == 554 and reply.startswith(b"5.6.0 Rejected: "), reply
    assert next_hop.deliveries == []
