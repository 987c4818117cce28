"""The content checks end to end: Postfix content_filter -> worker with real clamd and
spamd -> Postfix reinjection -> smtp-sink, and the Django quarantine; what is held shows
in the viewer's list with its reason."""

from __future__ import annotations

import io
import zipfile

import pytest
from django.urls import reverse

from mailfilter.checks.clamd import ClamdClient
from mailfilter.checks.spamd import SpamdClient
from mailfilter.interfaces import StaticRecipientLookup
from mailfilter.policy import BUILTIN_DEFAULT_PROFILE, CheckPolicy
from mailfilter.profiles import parse_profile
from quarantine.models import Message
from quarantine.sink import DjangoQuarantineSink
from quarantine.store import FileStore
from tests.conftest import build_mail
from tests.e2e.postfix import chain_factory, requires_postfix, wait_until
from tests.mailfilter.daemons import clamd_daemon, eicar, spamd_daemon  # noqa: F401

pytestmark = requires_postfix
postfix_chain = pytest.fixture(chain_factory, name="postfix_chain")

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def with_attachment(name: str, data: bytes, kind: str, *, subject: str) -> bytes:
    from email.message import EmailMessage

    mail = EmailMessage()
    mail["From"] = "Sender <sender@remote.example>"
    mail["To"] = "alice@example.test"
    mail["Subject"] = subject
    mail.set_content("See the attachment.\n")
    main, sub = kind.split("/")
    mail.add_attachment(data, maintype=main, subtype=sub, filename=name)
    return mail.as_bytes()


def zipped(name: str, data: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr(name, data)
    return out.getvalue()


@pytest.fixture
def checked_chain(postfix_chain, clamd, spamd, quarantine_dir):
    def make(profile=BUILTIN_DEFAULT_PROFILE):
        policy = CheckPolicy(
            clamd=ClamdClient(host=clamd.host, port=clamd.port, timeout=10),
            spamd=SpamdClient(host=spamd.host, port=spamd.port, timeout=20),
        )
        return postfix_chain(
            sink=DjangoQuarantineSink(FileStore(quarantine_dir)),
            policy=policy,
            lookup=StaticRecipientLookup(default=profile),
        )

    return make


def held(count: int = 1) -> list[Message]:
    wait_until(lambda: Message.objects.count() >= count, timeout=30)
    return list(Message.objects.order_by("received_at"))


def test_virus_is_quarantined_and_listed_with_its_name_for_the_recipient(
    transactional_db, world, checked_chain, client
):
    # No virus_scan in the profile: the name comes from clamd.
    chain = checked_chain(parse_profile("virus_destiny=discard\n", name="clamd-only"))
    chain.send(build_mail(subject="a virus", body="x\n" + eicar().decode() + "\n"))
    [message] = held()
    assert chain.queue_empty()
    assert message.category == "VIRUS"
    assert "Eicar-Test-Signature" in message.reasons
    assert chain.sink.dumps() == []
    client.force_login(world.alice)
    page = client.get(reverse("quarantine:list") + "?category=VIRUS")
    assert page.status_code == 200
    assert b"a virus" in page.content
    # The list itself names the virus, not only the detail page.
    assert b"Eicar-Test-Signature" in page.content
    detail = client.get(reverse("quarantine:detail", args=[message.mail_id]))
    assert b"Eicar-Test-Signature" in detail.content


def test_banned_exe_inside_a_zip_is_quarantined(transactional_db, world, checked_chain, client):
    chain = checked_chain()
    chain.send(with_attachment("invoice.zip", zipped("invoice.pdf.exe", b"MZ" + b"\0" * 64),
                               "application/zip", subject="a banned one"))
    [message] = held()
    assert message.category == "BANNED"
    assert "invoice.pdf.exe" in message.reasons
    # bounce (Medium's default): Postfix returns the message to its sender.
    assert chain.queue_empty(timeout=20)
    client.force_login(world.vadmin)
    detail = client.get(reverse("quarantine:detail", args=[message.mail_id]))
    assert b"invoice.pdf.exe" in detail.content


def test_gtube_is_spam_and_discarded_into_the_quarantine(transactional_db, checked_chain):
    chain = checked_chain(
        parse_profile("reject_score=5\nspamassassin=1\nspam_destiny=discard\n", name="Strict")
    )
    chain.send(build_mail(subject="gtube", body=f"Test\n{GTUBE}\n"))
    [message] = held()
    assert message.category == "SPAM"
    assert "GTUBE" in message.reasons
    assert message.spam_score is not None and message.spam_score >= 5
    assert chain.queue_empty() and chain.sink.dumps() == []


def test_gtube_with_pass_is_delivered_tagged_with_its_spam_headers(
    transactional_db, checked_chain
):
    chain = checked_chain(
        parse_profile("reject_score=5\nspamassassin=1\nsubject_tag=[SPAM]\n", name="Warning")
    )
    chain.send(build_mail(subject="gtube", body=f"Test\n{GTUBE}\n"))
    [dump] = chain.delivered(1)
    assert b"\nSubject: [SPAM] gtube" in dump.replace(b"\r\n", b"\n")
    assert b"X-Spam-Status: Yes, score=" in dump
    assert b"GTUBE" in dump
    assert b"X-Virus-Scanned: spamviewer" in dump
    assert Message.objects.count() == 0


def test_clean_mail_passes_with_a_no_spam_status(transactional_db, checked_chain):
    chain = checked_chain()
    chain.send(build_mail(subject="clean", body="Nothing to see.\n"))
    [dump] = chain.delivered(1)
    assert b"X-Spam-Status: No, score=" in dump
    assert chain.queue_empty()
