"""Built-in signatures (virus_scan): the file format, EICAR anywhere, reloads."""

from __future__ import annotations

import base64
import io
import zipfile

import pytest

from mailfilter.checks.virus import (
    SignatureError,
    SignatureLibrary,
    check_virus,
    load_signatures,
    parse_signatures,
)
from mailfilter.profiles import BUILTIN_SIGNATURES, parse_profile
from tests.mailfilter.daemons import eicar

DEFAULT = BUILTIN_SIGNATURES / "default.sigs"


def test_the_builtin_file_finds_eicar_in_a_plain_blob():
    hits = load_signatures(DEFAULT).scan([("attachment", eicar())])
    assert [(hit.name, hit.label) for hit in hits] == [("Eicar-Test-Signature", "attachment")]


def test_the_builtin_file_finds_eicar_inside_a_larger_blob_with_whitespace():
    blob = b"Subject: hi\r\nX-Test: " + eicar() + b"\r\n\r\nbody\r\n"
    assert load_signatures(DEFAULT).scan([("message", blob)])


def test_the_raw_message_blob_covers_headers_preambles_and_epilogues():
    signatures = load_signatures(DEFAULT)
    for message in (
        b"X-Payload: " + eicar() + b"\r\n\r\nhi\r\n",
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n' + eicar() + b"\r\n--b--\r\n",
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b--\r\n' + eicar(),
    ):
        assert signatures.scan([("message", message)]), message


def test_clean_text_has_no_hits():
    assert load_signatures(DEFAULT).scan([("message", b"Hello, this is a normal message.")]) == []


def test_each_blob_is_reported_with_its_label():
    blobs = [("message", b"clean"), ("part 2", eicar()), ("part 3", b"x" + eicar())]
    labels = [hit.label for hit in load_signatures(DEFAULT).scan(blobs)]
    assert labels == ["part 2", "part 3"]


def test_a_base64_encoded_eicar_is_found_only_once_the_caller_decodes_it():
    # The scanner matches bytes as given: the MIME parser hands over decoded parts.
    encoded = base64.b64encode(eicar())
    signatures = load_signatures(DEFAULT)
    assert signatures.scan([("raw", encoded)]) == []
    assert signatures.scan([("decoded", base64.b64decode(encoded))])


def test_an_archive_member_is_found_when_given_as_a_blob():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("eicar.com", eicar())
    with zipfile.ZipFile(buffer) as archive:
        member = archive.read("eicar.com")
    assert load_signatures(DEFAULT).scan([("eicar.zip: eicar.com", member)])


def test_text_and_hex_patterns_with_wildcards():
    signatures = parse_signatures(
        "# test\n\nPlain-Text=text:evil payload\nHex-Wild=4d5a??000300ff\n"
    )
    assert [h.name for h in signatures.scan([("a", b"an evil payload here")])] == ["Plain-Text"]
    assert [h.name for h in signatures.scan([("b", b"..MZ\x90\x00\x03\x00\xff..")])] == ["Hex-Wild"]
    assert [h.name for h in signatures.scan([("c", b"..MZ\n\x00\x03\x00\xff..")])] == ["Hex-Wild"]
    assert signatures.scan([("d", b"MZ\x90\x00\x04\x00\xff")]) == []


@pytest.mark.parametrize(
    "line, reason",
    [
        ("no equals sign", "NAME=PATTERN"),
        ("bad name!=41424344454647", "bad signature name"),
        ("Odd=4142434", "neither hex"),
        ("Short=41424344", "shorter"),
        ("ShortText=text:abc", "shorter"),
    ],
)
def test_a_bad_signature_line_is_refused_with_file_and_line(tmp_path, line, reason):
    path = tmp_path / "bad.sigs"
    path.write_text(f"# header\nGood=text:goodgood\n{line}\n")
    with pytest.raises(SignatureError) as caught:
        load_signatures(path)
    assert caught.value.line == 3 and reason in caught.value.reason
    assert str(caught.value).startswith(f"{path}:3:")


def test_check_virus_uses_the_profiles_files_and_scores():
    profile = parse_profile("virus_scan=5,default.sigs\n", name="test")
    library = SignatureLibrary([DEFAULT])
    findings = check_virus([("part 1", eicar())], profile=profile, library=library)
    assert [(f.category, f.name, f.score) for f in findings] == [
        ("VIRUS", "Eicar-Test-Signature", 5)
    ]
    assert "part 1" in findings[0].detail


def test_a_profile_without_virus_scan_finds_nothing():
    profile = parse_profile("reject=0\n", name="test")
    assert check_virus([("x", eicar())], profile=profile, library=SignatureLibrary()) == []


def test_the_library_reads_a_file_no_profile_named_at_the_last_reload(tmp_path):
    path = tmp_path / "extra.sigs"
    path.write_text("Extra=text:extra-bad\n")
    library = SignatureLibrary()
    assert library.get(path).scan([("x", b"an extra-bad thing")])


def test_reload_picks_up_new_signatures(tmp_path):
    path = tmp_path / "local.sigs"
    path.write_text("First=text:first-pattern\n")
    library = SignatureLibrary([path])
    path.write_text("First=text:first-pattern\nSecond=text:second-pattern\n")
    library.reload()
    assert [h.name for h in library.get(path).scan([("x", b"second-pattern")])] == ["Second"]


def test_reload_keeps_the_old_signatures_when_the_file_breaks(tmp_path):
    path = tmp_path / "local.sigs"
    path.write_text("First=text:first-pattern\n")
    library = SignatureLibrary([path])
    path.write_text("First=text:first-pattern\nbroken line\n")
    with pytest.raises(SignatureError):
        library.reload()
    assert [h.name for h in library.get(path).scan([("x", b"first-pattern")])] == ["First"]


def test_a_name_is_resolved_once_until_the_next_reload(tmp_path, monkeypatch):
    first, second = tmp_path / "first.sigs", tmp_path / "second.sigs"
    first.write_text("First=text:first-pattern\n")
    second.write_text("Second=text:second-pattern\n")
    link = tmp_path / "local.sigs"
    link.symlink_to(first)
    library = SignatureLibrary([link])
    calls = []
    resolve = type(link).resolve

    def counting(self, *args, **kwargs):
        calls.append(self)
        return resolve(self, *args, **kwargs)

    monkeypatch.setattr(type(link), "resolve", counting)
    for _ in range(3):
        assert library.get(str(link)).scan([("x", b"first-pattern")])
    assert len(calls) == 1
    link.unlink()
    link.symlink_to(second)
    library.reload([link])
    assert [h.name for h in library.get(str(link)).scan([("x", b"second-pattern")])] == [
        "Second"
    ]
