"""Indexing quarantine directories into Message/Recipient rows."""

from __future__ import annotations

import base64
import gzip
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest

from quarantine import indexer
from quarantine.indexer import index_directory, index_file
from quarantine.models import Message, Recipient
from quarantine.store import FileStore, StoreError

SAMPLES = Path(__file__).parent / "samples"

pytestmark = pytest.mark.django_db


def copy_samples(tmp_path: Path, name: str) -> Path:
    """A writable copy of a sample directory (the originals stay untouched)."""
    root = tmp_path / name
    shutil.copytree(SAMPLES / name, root)
    return root


def quarantine_file(
    mail_id: str,
    *,
    delivered_to: str = "spam-quarantine",
    recipients: str = "<alice@example.test>",
    extra: bytes = b"",
    header: bytes = b"From: Sender <s@remote.example>\nSubject: hello\n",
    body: bytes = b"body\n",
) -> bytes:
    """An amavisd-new quarantine file, built the way amavisd lays it out."""
    return (
        b"Return-Path: <s@remote.example>\n"
        b"Delivered-To: " + delivered_to.encode() + b"\n"
        b"X-Envelope-From: <s@remote.example>\n"
        b"X-Envelope-To: " + recipients.encode() + b"\n"
        b"X-Quarantine-ID: <" + mail_id.encode() + b">\n" + extra +
        b"Received: from mx.remote.example ([192.0.2.1])\n by localhost (amavis, port 10024)"
        b" with ESMTP id " + mail_id.encode() + b";\n Mon, 02 Nov 2026 08:00:00 +0000 (UTC)\n"
        + header + b"\n" + body
    )


def original_size(path: Path) -> int:
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    return len(data) - data.index(b"Received: from")


# The real amavisd-new samples -----------------------------------------------------------


def test_flat_amavis_directory_is_indexed_with_every_field(tmp_path):
    root = copy_samples(tmp_path, "amavis")

    summary = index_directory(root)

    assert (summary.new, summary.unchanged, summary.unreadable, summary.skipped) == (4, 0, 0, 0)
    assert summary.errors == []
    rows = {m.mail_id: m for m in Message.objects.all()}
    assert set(rows) == {"7Mp0Edi5wAbf", "doXKqCTW9Pp6", "lr2SA3EdWjnc", "qxTrB11QS2pI"}
    for message in rows.values():
        assert message.origin == str(root.resolve())
        assert message.envelope_sender == "sender@example.org"
        assert message.from_header == "Sender Person <sender@example.org>"
        assert message.to_header == "User <user@example.test>"
        assert message.date == datetime(2023, 11, 20, 10, 0, tzinfo=UTC)
        assert message.size == original_size(root / message.storage_key)
        path = root / message.storage_key
        assert message.file_size == path.stat().st_size
        assert message.file_mtime_ns == path.stat().st_mtime_ns
        assert list(message.recipients.values_list("address", "category")) == [
            ("user@example.test", message.category)
        ]

    badh = rows["7Mp0Edi5wAbf"]
    assert (badh.category, badh.storage_key) == ("BADH", "badh-7Mp0Edi5wAbf")
    assert badh.subject == "Grüße aus Köln - non-encoded 8-bit latin-1 header"
    assert badh.received_at == datetime(2026, 11, 23, 8, 49, 6, tzinfo=UTC)
    assert badh.spam_score is None
    assert badh.reasons.startswith("bad header: Non-encoded non-ASCII data (and not UTF-8)")

    banned = rows["doXKqCTW9Pp6"]
    assert (banned.category, banned.subject) == ("BANNED", "Invoice")
    assert banned.reasons == "banned: application/octet-stream,.exe,.exe-ms,setup.exe"

    spam = rows["lr2SA3EdWjnc"]
    assert (spam.category, spam.subject, spam.storage_key) == (
        "SPAM", "GTUBE test", "spam-lr2SA3EdWjnc.gz"
    )
    assert spam.spam_score == pytest.approx(1001.3)
    assert spam.reasons == "tests: GTUBE=1000, RCVD_ILLEGAL_IP=1.3"

    virus = rows["qxTrB11QS2pI"]
    assert (virus.category, virus.subject) == ("VIRUS", "EICAR test")
    assert virus.reasons == "virus: Bench.Test.EICAR_NDB-1.UNOFFICIAL"
    assert virus.received_at == datetime(2026, 11, 23, 8, 49, 2, tzinfo=UTC)


def test_directory_with_one_level_of_subdirectories_is_indexed(tmp_path):
    root = copy_samples(tmp_path, "amavis-subdirs")

    summary = index_directory(root)

    assert summary.new == 3
    rows = {m.storage_key: m for m in Message.objects.all()}
    assert set(rows) == {"b/virus-bf2ScJ7VZJps", "m/banned-mtXL2VQcsRhl",
                         "u/spam-utF85Fda9qv9.gz"}
    virus = rows["b/virus-bf2ScJ7VZJps"]
    assert virus.category == "VIRUS"
    assert virus.envelope_sender == "sender@remote.example.net"
    assert virus.subject == "virus test"
    assert virus.to_header == "user1@example.com, user2@example.com"
    assert sorted(virus.recipients.values_list("address", flat=True)) == [
        "user1@example.com", "user2@example.com"
    ]
    assert virus.reasons == (
        "virus: Eicar-Test-Signature.NDB.UNOFFICIAL\n"
        "banned: application/octet-stream,eicar.com"
    )
    assert virus.spam_score is None
    assert virus.received_at == datetime(2026, 11, 23, 8, 40, 15, tzinfo=UTC)
    banned = rows["m/banned-mtXL2VQcsRhl"]
    assert (banned.category, banned.subject) == ("BANNED", "banned test")
    assert banned.reasons == "banned: application/octet-stream,invoice.pdf.exe"
    spam = rows["u/spam-utF85Fda9qv9.gz"]
    assert (spam.category, spam.subject, spam.from_header) == (
        "SPAM", "spam test", "sender@remote.example.net"
    )
    assert spam.spam_score == pytest.approx(999.998)
    assert spam.reasons == "tests: GTUBE=1000, NO_RECEIVED=-0.001, NO_RELAYS=-0.001"
    assert list(spam.recipients.values_list("address", flat=True)) == ["user1@example.com"]


# Incremental runs ---------------------------------------------------------------------


def test_second_run_over_unchanged_directory_parses_nothing(tmp_path):
    root = copy_samples(tmp_path, "amavis")
    index_directory(root)
    # Same size, same mtime, different content: only a run that opened the file could
    # notice, and the row proves it was not opened.
    path = root / "banned-doXKqCTW9Pp6"
    before = path.stat()
    data = path.read_bytes()
    path.write_bytes(data.replace(b"Subject: Invoice", b"Subject: XXXXXXX"))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size

    summary = index_directory(root)

    assert (summary.new, summary.updated, summary.unchanged, summary.removed) == (0, 0, 4, 0)
    assert Message.objects.get(mail_id="doXKqCTW9Pp6").subject == "Invoice"
    assert Message.objects.count() == 4


def test_changed_file_is_indexed_again_and_keeps_its_releases(tmp_path, world):
    root = copy_samples(tmp_path, "amavis-subdirs")
    index_directory(root)
    virus = Message.objects.get(mail_id="bf2ScJ7VZJps")
    released = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
    Recipient.objects.filter(message=virus, address="user1@example.com").update(
        released_at=released, released_by=world.vadmin
    )
    path = root / "b/virus-bf2ScJ7VZJps"
    data = path.read_bytes()
    data = data.replace(b"Subject: virus test", b"Subject: changed subject, longer")
    data = data.replace(b"<user1@example.com>, <user2@example.com>\nX-Quarantine",
                        b"<user1@example.com>, <user3@example.com>\nX-Quarantine")
    path.write_bytes(data)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 5_000_000_000))

    summary = index_directory(root)

    assert (summary.new, summary.updated, summary.unchanged) == (0, 1, 2)
    virus = Message.objects.get(mail_id="bf2ScJ7VZJps")
    assert virus.subject == "changed subject, longer"
    assert virus.file_size == len(data)
    rcpts = dict(virus.recipients.values_list("address", "released_at"))
    assert rcpts == {"user1@example.com": released, "user3@example.com": None}


def test_rows_of_a_deleted_file_are_removed(tmp_path):
    root = copy_samples(tmp_path, "amavis-subdirs")
    index_directory(root)
    (root / "b/virus-bf2ScJ7VZJps").unlink()

    summary = index_directory(root)

    assert (summary.removed, summary.unchanged) == (1, 2)
    assert not Message.objects.filter(mail_id="bf2ScJ7VZJps").exists()
    assert not Recipient.objects.filter(message__mail_id="bf2ScJ7VZJps").exists()
    assert Recipient.objects.filter(address="user2@example.com").count() == 1
    assert Message.objects.count() == 2


def test_missing_directory_is_an_error_and_removes_nothing(tmp_path):
    root = copy_samples(tmp_path, "amavis")
    index_directory(root)
    shutil.rmtree(root)

    with pytest.raises(StoreError, match=str(root)):
        index_directory(root)

    assert Message.objects.count() == 4


def test_rows_written_under_a_symlinked_spelling_of_the_directory_are_recognised(tmp_path):
    root = copy_samples(tmp_path, "amavis")
    link = tmp_path / "link"
    link.symlink_to(root)
    index_directory(link)
    Message.objects.update(origin=str(link))

    summary = index_directory(link)

    assert (summary.new, summary.unchanged, summary.removed) == (0, 4, 0)


def test_many_files_are_inserted_in_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(indexer, "BATCH_SIZE", 7)
    root = tmp_path / "many"
    root.mkdir()
    for n in range(30):
        mail_id = f"batch{n:04d}xyz"
        (root / f"spam-{mail_id}").write_bytes(
            quarantine_file(mail_id, recipients=f"<u{n}@example.test>, <all@example.test>")
        )
    calls: list[tuple[int, int]] = []

    summary = index_directory(root, progress=lambda done, total: calls.append((done, total)))

    assert summary.new == 30
    assert Message.objects.count() == 30
    assert Recipient.objects.filter(address="all@example.test").count() == 30
    assert calls[-1] == (30, 30) and len(calls) == 30
    for n in range(0, 30, 2):
        (root / f"spam-batch{n:04d}xyz").unlink()
    assert index_directory(root).removed == 15


# What is and is not indexed -----------------------------------------------------------------


def test_clean_archive_and_unrelated_files_are_skipped_without_errors(tmp_path):
    root = tmp_path / "q"
    root.mkdir()
    (root / "clean-abcdefgh1234").write_bytes(
        quarantine_file("abcdefgh1234", delivered_to="clean-quarantine"))
    (root / "archive-bcdefghi1234.gz").write_bytes(
        gzip.compress(quarantine_file("bcdefghi1234", delivered_to="archive-quarantine")))
    (root / "README").write_text("notes of the mail admin\n")
    (root / "spam-cdefghij1234").write_bytes(quarantine_file("cdefghij1234"))

    summary = index_directory(root)

    assert (summary.new, summary.skipped, summary.unreadable) == (1, 3, 0)
    assert summary.errors == []
    assert list(Message.objects.values_list("mail_id", flat=True)) == ["cdefghij1234"]


def test_category_comes_from_the_file_name_when_delivered_to_is_unknown(tmp_path):
    root = tmp_path / "q"
    root.mkdir()
    (root / "banned-abcdefgh1234").write_bytes(
        quarantine_file("abcdefgh1234", delivered_to="custom-box"))

    index_directory(root)

    assert Message.objects.get().category == "BANNED"


def test_mail_id_comes_from_the_file_name_when_the_header_has_none(tmp_path):
    root = tmp_path / "q"
    root.mkdir()
    data = quarantine_file("abcdefgh1234").replace(b"X-Quarantine-ID: <abcdefgh1234>\n", b"")
    (root / "virus-zyxwvuts9876").write_bytes(data)

    index_directory(root)

    assert Message.objects.get().mail_id == "zyxwvuts9876"


def test_broken_files_are_reported_by_name_and_the_run_goes_on(tmp_path):
    root = copy_samples(tmp_path, "amavis")
    good = gzip.compress(quarantine_file("trunc0001abc"))
    broken = {
        "spam-trunc0001abc.gz": good[: len(good) // 2],
        "spam-garbage001abc.gz": b"\x1f\x8b" + os.urandom(500),
        "virus-random001abc": os.urandom(2000).replace(b":", b"."),
        "banned-empty0001abc": b"",
        "badh-nohead0001abc": b"just a body line\nand another\n",
    }
    for name, data in broken.items():
        (root / name).write_bytes(data)

    summary = index_directory(root)

    assert summary.new == 4
    assert summary.unreadable == 5
    for name in broken:
        assert [e for e in summary.errors if str(root.resolve() / name) in e], name
    assert Message.objects.count() == 4
    # A broken file is tried again next time: it may have been half-written.
    (root / "spam-trunc0001abc.gz").write_bytes(good)
    again = index_directory(root)
    assert (again.new, again.unreadable, again.unchanged) == (1, 4, 4)


def test_a_file_whose_parse_fails_unexpectedly_is_reported_and_the_run_goes_on(
    tmp_path, monkeypatch
):
    """Whatever error one file's parse raises, the run indexes the others and reports
    that file by name: one file never hides the rest of the quarantine."""
    root = tmp_path / "q"
    root.mkdir()
    for mail_id in ("first0001abc", "odd00001abcd", "third0001abc"):
        (root / f"spam-{mail_id}").write_bytes(quarantine_file(mail_id))
    real = indexer._read_head

    def read_head(store, key):
        if "odd0" in key:
            raise RuntimeError("an error no file should cause")
        return real(store, key)

    monkeypatch.setattr(indexer, "_read_head", read_head)

    summary = index_directory(root)

    assert (summary.new, summary.unreadable) == (2, 1)
    assert [e for e in summary.errors if "spam-odd00001abcd" in e and "no file" in e]
    assert sorted(Message.objects.values_list("mail_id", flat=True)) == [
        "first0001abc", "third0001abc"
    ]


def test_same_mail_id_in_a_second_directory_is_reported_naming_both_files(tmp_path):
    first = copy_samples(tmp_path, "amavis")
    second = tmp_path / "second"
    second.mkdir()
    shutil.copy(first / "virus-qxTrB11QS2pI", second / "virus-qxTrB11QS2pI")
    (second / "spam-other0001abc").write_bytes(quarantine_file("other0001abc"))
    index_directory(first)

    summary = index_directory(second)

    assert (summary.new, summary.skipped) == (1, 1)
    (error,) = summary.errors
    assert str(second.resolve() / "virus-qxTrB11QS2pI") in error
    assert str(first.resolve()) + "/virus-qxTrB11QS2pI" in error
    assert Message.objects.get(mail_id="qxTrB11QS2pI").origin == str(first.resolve())


def test_same_mail_id_twice_in_one_directory_is_indexed_once(tmp_path):
    root = tmp_path / "q"
    root.mkdir()
    (root / "spam-abcdefgh1234").write_bytes(quarantine_file("abcdefgh1234"))
    (root / "spam-abcdefgh1234.gz").write_bytes(gzip.compress(quarantine_file("abcdefgh1234")))

    summary = index_directory(root)

    assert (summary.new, summary.skipped) == (1, 1)
    assert "abcdefgh1234" in summary.errors[0]
    assert Message.objects.count() == 1


# Hostile and odd headers --------------------------------------------------------------------


def _index_one(tmp_path, data: bytes, name: str = "spam-hostile0001x") -> Message:
    root = tmp_path / "q"
    root.mkdir(exist_ok=True)
    (root / name).write_bytes(data)
    summary = index_directory(root)
    assert summary.errors == []
    return Message.objects.get(storage_key=name)


def test_encoded_line_break_in_subject_is_stored_visible_not_raw(tmp_path):
    header = (b"From: =?utf-8?q?Bank=0D=0ABcc=3A_x=40evil?= <s@remote.example>\n"
              b"Subject: =?utf-8?b?" + base64.b64encode(
                  b"Hi\r\nX-Injected: yes") + b"?=\n")
    message = _index_one(tmp_path, quarantine_file("hostile0001x", header=header))

    assert message.subject == "Hi\\r\\nX-Injected: yes"
    assert "\n" not in message.from_header and "\r" not in message.from_header
    assert message.from_header.endswith("<s@remote.example>")


def test_unknown_charset_and_broken_encodings_do_not_stop_indexing(tmp_path):
    header = (b"From: =?x-no-such-charset?q?J=F6rg?= <s@remote.example>\n"
              b"Subject: =?utf-8?b?!!!not base64?= and =?utf-8?q?caf=C3?=\n"
              b"To: \xff\xfe broken <a@example.test>\n")
    message = _index_one(tmp_path, quarantine_file("hostile0001x", header=header))

    assert message.from_header == "Jörg <s@remote.example>"
    assert message.subject
    assert message.to_header.endswith("<a@example.test>")


def test_twenty_thousand_addresses_in_to_are_bounded(tmp_path):
    many = b", ".join(b"user%d@example.test" % n for n in range(20_000))
    header = b"To: " + many + b"\nSubject: many\n"
    message = _index_one(tmp_path, quarantine_file("hostile0001x", header=header))

    assert len(message.to_header) <= 2000
    assert message.to_header.startswith("user0@example.test, user1@example.test")
    assert message.subject == "many"


def test_bad_date_is_none_and_received_at_falls_back_to_the_file_mtime(tmp_path):
    data = quarantine_file("hostile0001x", header=b"Date: Mon, 99 Foo 20x\nSubject: d\n")
    data = data.replace(b";\n Mon, 02 Nov 2026 08:00:00 +0000 (UTC)", b"; yesterday-ish")
    root = tmp_path / "q"
    root.mkdir()
    path = root / "spam-hostile0001x"
    path.write_bytes(data)
    os.utime(path, (1_700_000_000, 1_700_000_000))

    index_directory(root)

    message = Message.objects.get()
    assert message.date is None
    assert message.received_at == datetime.fromtimestamp(1_700_000_000, UTC)


def test_received_date_in_the_future_of_the_file_is_not_believed(tmp_path):
    data = quarantine_file("hostile0001x").replace(b"Nov 2026", b"Nov 2099")
    root = tmp_path / "q"
    root.mkdir()
    (root / "spam-hostile0001x").write_bytes(data)
    os.utime(root / "spam-hostile0001x", (1_800_000_000, 1_800_000_000))

    index_directory(root)

    assert Message.objects.get().received_at == datetime.fromtimestamp(1_800_000_000, UTC)


def test_score_comes_from_x_spam_status_when_x_spam_score_is_missing(tmp_path):
    extra = b"X-Spam-Status: Yes, score=12.5 tag=2 tests=[BAYES_99=3.5,\n URIBL=9]\n"
    message = _index_one(tmp_path, quarantine_file("hostile0001x", extra=extra))

    assert message.spam_score == 12.5
    assert message.reasons == "tests: BAYES_99=3.5, URIBL=9"


@pytest.mark.parametrize("value", [b"nan", b"inf", b"lots", b""])
def test_spam_score_that_is_not_a_finite_number_is_none(tmp_path, value):
    extra = b"X-Spam-Score: " + value + b"\n"
    message = _index_one(tmp_path, quarantine_file("hostile0001x", extra=extra))
    assert message.spam_score is None


def test_header_section_is_parsed_only_up_to_the_blank_line(tmp_path):
    body = b"Subject: this line is in the body\nFrom: body@evil.example\n"
    header = b"From: Real <real@remote.example>\n"
    message = _index_one(tmp_path, quarantine_file("hostile0001x", header=header, body=body))

    assert message.subject == ""
    assert message.from_header == "Real <real@remote.example>"


def test_recipients_are_lower_cased_and_kept_once(tmp_path):
    data = quarantine_file(
        "hostile0001x", recipients="<Alice@Example.TEST>,\n <alice@example.test>, <>, <b@x.test>"
    )
    message = _index_one(tmp_path, data)

    assert sorted(message.recipients.values_list("address", flat=True)) == [
        "alice@example.test", "b@x.test"
    ]


# One file -------------------------------------------------------------------------------------


def test_index_file_inserts_then_refreshes_one_file(tmp_path):
    root = tmp_path / "q"
    root.mkdir()
    store = FileStore(root)
    (root / "spam-single0001x").write_bytes(quarantine_file("single0001x"))

    message = index_file(store, "spam-single0001x")
    assert (message.mail_id, message.subject) == ("single0001x", "hello")
    assert list(message.recipients.values_list("address", flat=True)) == ["alice@example.test"]

    (root / "spam-single0001x").write_bytes(
        quarantine_file("single0001x", header=b"Subject: again\n"))
    again = index_file(store, "spam-single0001x")
    assert (again.id, again.subject) == (message.id, "again")
    assert Message.objects.count() == 1


def test_file_indexed_by_the_filter_during_the_run_is_not_reported_as_a_clash(tmp_path):
    root = tmp_path / "q"
    root.mkdir()
    (root / "spam-aaaaaaaa0001").write_bytes(quarantine_file("aaaaaaaa0001"))
    (root / "spam-bbbbbbbb0002").write_bytes(quarantine_file("bbbbbbbb0002"))
    store = FileStore(root.resolve())

    def filter_stores_second_file(done: int, total: int) -> None:
        # What the filter does when it quarantines a message while the indexer runs.
        if done == 1:
            index_file(store, "spam-bbbbbbbb0002")

    summary = index_directory(root, progress=filter_stores_second_file)

    assert (summary.new, summary.unchanged, summary.skipped) == (1, 1, 0)
    assert summary.errors == []
    assert Message.objects.count() == 2
