"""The file store: amavisd-new compatible files written durably and read back."""

from __future__ import annotations

import gzip
import os
import shutil
import stat
from pathlib import Path

import pytest

from quarantine.store import (
    FileStore,
    StoreError,
    generate_mail_id,
    name_info,
    parse_quarantine_file,
)
from tests.conftest import build_mail

SAMPLES = Path(__file__).parent / "samples"
CATEGORIES = ["VIRUS", "BANNED", "SPAM", "BADH"]


@pytest.fixture
def store(tmp_path) -> FileStore:
    return FileStore(tmp_path / "store", subdir_levels=1)


def _write(store: FileStore, category: str = "SPAM", *, gz: bool | None = None, **kwargs):
    mail_id, _ = generate_mail_id()
    raw = kwargs.pop("message", None) or build_mail(subject=f"{category} round trip")
    key = store.write(
        category=category,
        mail_id=mail_id,
        message=raw,
        sender=kwargs.pop("sender", "sender@remote.example"),
        recipients=kwargs.pop("recipients", ["Alice@example.test", "bob@example.test"]),
        gz=gz,
        **kwargs,
    )
    return mail_id, key, raw


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("category", CATEGORIES)
def test_written_file_reads_back_with_its_envelope_and_message(store, category, gz):
    mail_id, key, raw = _write(
        store, category, gz=gz, findings=[("X-Spam-Score", "7.5")]
    )

    assert key == f"{mail_id[0]}/{category.lower()}-{mail_id}{'.gz' if gz else ''}"
    loaded = store.load(key)
    assert loaded.category == category
    assert loaded.mail_id == mail_id
    assert loaded.sender == "sender@remote.example"
    assert loaded.recipients == ["Alice@example.test", "bob@example.test"]
    assert loaded.blocked_recipients == loaded.recipients
    assert loaded.first("X-Spam-Score") == "7.5"
    # The original message comes back byte for byte, with LF line ends as amavisd stores it.
    assert loaded.message == raw.replace(b"\r\n", b"\n")
    on_disk = store.path(key).read_bytes()
    assert on_disk.startswith(b"\x1f\x8b") is gz
    assert name_info(store.path(key).name) == (category, mail_id, gz)


def test_spam_is_gzipped_by_default_as_amavisd_does(store):
    _, key, _ = _write(store, "SPAM")
    assert key.endswith(".gz")
    assert gzip.decompress(store.path(key).read_bytes()).startswith(b"Return-Path: <")


def test_written_file_has_mode_0640_and_its_directory_0750(store):
    _, key, _ = _write(store, "VIRUS")
    path = store.path(key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o750


def test_write_leaves_no_temporary_file_behind(store):
    for category in CATEGORIES:
        _write(store, category)
    names = [p.name for p in store.root.rglob("*")]
    assert not [n for n in names if n.startswith(".tmp-")]
    assert len(list(store.iter_files())) == 4


def test_second_write_with_the_same_id_refuses_to_overwrite(store):
    mail_id, key, _ = _write(store, "BANNED")
    before = store.path(key).read_bytes()

    with pytest.raises(StoreError, match="exists already"):
        store.write(category="BANNED", mail_id=mail_id, message=b"Subject: other\n\nx\n",
                    sender="other@remote.example", recipients=["x@example.test"])

    assert store.path(key).read_bytes() == before
    assert not list(store.root.rglob(".tmp-*"))


@pytest.mark.parametrize(
    "address",
    ["evil@example.test\r\nX-Injected: yes", "evil@example.test\nBcc: x@y", "a\0b@example"],
    ids=["crlf", "lf", "nul"],
)
def test_envelope_address_with_line_break_or_nul_is_refused(store, address):
    with pytest.raises(StoreError, match="forbidden character"):
        _write(store, "SPAM", recipients=[address])
    with pytest.raises(StoreError, match="forbidden character"):
        _write(store, "SPAM", sender=address)
    assert not store.root.exists() or not any(store.root.rglob("*"))


@pytest.mark.parametrize(
    "key",
    ["../etc/passwd", "s/../../x", "/etc/passwd", "s/spam-x\0.gz", "", "s//x", "./x", "s\\x"],
)
def test_key_that_would_leave_the_store_is_refused(store, key):
    with pytest.raises(StoreError, match="invalid storage key"):
        store.path(key)
    with pytest.raises(StoreError):
        store.read(key)


def test_invalid_mail_id_is_refused_before_anything_is_written(store):
    with pytest.raises(StoreError, match="invalid mail_id"):
        store.write(category="SPAM", mail_id="../../etc", message=b"x\n",
                    sender="s@x", recipients=["r@x"])
    assert not store.root.exists() or not any(store.root.rglob("*"))


def test_read_of_a_truncated_gzip_file_is_a_store_error(store):
    _, key, _ = _write(store, "SPAM")
    path = store.path(key)
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(StoreError, match="unreadable"):
        store.read(key)


def test_delete_removes_the_file_and_reports_a_second_delete(store):
    _, key, _ = _write(store, "VIRUS")
    assert store.delete(key) is True
    assert not store.exists(key)
    assert store.delete(key) is False


def test_cleanup_removes_only_old_temporary_files(store):
    _, key, _ = _write(store, "VIRUS")
    old = store.path(key).parent / ".tmp-virus-x-abc"
    fresh = store.path(key).parent / ".tmp-virus-y-def"
    old.write_bytes(b"partial")
    fresh.write_bytes(b"partial")
    os.utime(old, (1, 1))

    assert store.cleanup_temporary(older_than_seconds=3600) == 1
    assert not old.exists()
    assert fresh.exists()
    assert store.exists(key)


# The real amavisd-new samples -------------------------------------------------------------

SAMPLE_EXPECTATIONS = {
    "amavis/badh-7Mp0Edi5wAbf": ("BADH", "7Mp0Edi5wAbf", "sender@example.org",
                                 ["user@example.test"]),
    "amavis/banned-doXKqCTW9Pp6": ("BANNED", "doXKqCTW9Pp6", "sender@example.org",
                                   ["user@example.test"]),
    "amavis/spam-lr2SA3EdWjnc.gz": ("SPAM", "lr2SA3EdWjnc", "sender@example.org",
                                    ["user@example.test"]),
    "amavis/virus-qxTrB11QS2pI": ("VIRUS", "qxTrB11QS2pI", "sender@example.org",
                                  ["user@example.test"]),
    "amavis-subdirs/b/virus-bf2ScJ7VZJps": ("VIRUS", "bf2ScJ7VZJps", "sender@remote.example.net",
                                            ["user1@example.com", "user2@example.com"]),
    "amavis-subdirs/m/banned-mtXL2VQcsRhl": ("BANNED", "mtXL2VQcsRhl",
                                             "sender@remote.example.net",
                                             ["user1@example.com", "user2@example.com"]),
    "amavis-subdirs/u/spam-utF85Fda9qv9.gz": ("SPAM", "utF85Fda9qv9",
                                              "sender@remote.example.net",
                                              ["user1@example.com"]),
}


def test_every_sample_file_is_covered():
    found = {str(p.relative_to(SAMPLES)) for p in SAMPLES.rglob("*") if p.is_file()}
    assert found == set(SAMPLE_EXPECTATIONS)


@pytest.mark.parametrize("sample", sorted(SAMPLE_EXPECTATIONS))
def test_real_amavis_sample_loads_with_its_envelope(tmp_path, sample):
    category, mail_id, sender, recipients = SAMPLE_EXPECTATIONS[sample]
    top, _, key = sample.partition("/")
    root = tmp_path / top
    shutil.copytree(SAMPLES / top, root)

    loaded = FileStore(root).load(key)

    assert loaded.category == category
    assert loaded.mail_id == mail_id
    assert loaded.sender == sender
    assert loaded.recipients == recipients
    assert loaded.blocked_recipients == recipients
    assert name_info(key.rsplit("/", 1)[-1])[:2] == (category, mail_id)
    # The original message starts at amavisd's own Received line, as its release does.
    assert loaded.message.startswith(b"Received: from ")


def test_parse_keeps_the_original_message_from_the_first_field_amavisd_did_not_add():
    data = (
        b"Return-Path: <s@x>\nDelivered-To: spam-quarantine\nX-Envelope-From: <s@x>\n"
        b"X-Envelope-To: <a@x>,\n <b@x>\nX-Quarantine-ID: <abcdefgh1234>\n"
        b"X-Spam-Status: Yes, score=9 tests=[A=1,\n B=2]\nFrom: s@x\nSubject: hi\n\nbody\n"
    )
    parsed = parse_quarantine_file(data)
    assert parsed.recipients == ["a@x", "b@x"]
    assert parsed.first("X-Spam-Status") == "Yes, score=9 tests=[A=1, B=2]"
    assert parsed.message == b"From: s@x\nSubject: hi\n\nbody\n"
