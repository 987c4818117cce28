"""CheckPolicy on crafted messages: categories, the highest one winning, scanner failures,
the headers of passed mail and the quarantine fields of held mail; real clamd and spamd."""

from __future__ import annotations

import asyncio
import io
import zipfile
from email.message import EmailMessage
from pathlib import Path

import pytest

from mailfilter.checks.clamd import ClamdClient
from mailfilter.checks.spamd import SpamdClient
from mailfilter.config import FilterConfig
from mailfilter.findings import Finding
from mailfilter.policy import (
    BUILTIN_DEFAULT_PROFILE,
    CheckPolicy,
    Envelope,
    FilterChecks,
    TemporaryFailure,
    strip_parts,
    tag_subject,
)
from mailfilter.profiles import BUILTIN_SIGNATURES, ProfileError, parse_profile
from tests.mailfilter.daemons import clamd_daemon, eicar, free_port, spamd_daemon  # noqa: F401

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
ENVELOPE = Envelope(sender="sender@remote.example", recipients=("alice@example.test",))
SIGS = BUILTIN_SIGNATURES / "default.sigs"


def profile(text: str, name: str = "test"):
    return parse_profile(text, name=name)


def message(body: str = "Hello there.\n", *, subject: str = "hello",
            attachments: tuple[tuple[str, bytes, str], ...] = ()) -> bytes:
    mail = EmailMessage()
    mail["From"] = "Sender <sender@remote.example>"
    mail["To"] = "alice@example.test"
    mail["Subject"] = subject
    mail["Date"] = "Fri, 20 Nov 2026 10:00:00 +0000"
    mail["Message-ID"] = "<policy-test@remote.example>"
    mail.set_content(body)
    for name, data, kind in attachments:
        main, sub = kind.split("/")
        mail.add_attachment(data, maintype=main, subtype=sub, filename=name)
    return mail.as_bytes(policy=mail.policy.clone(linesep="\r\n"))


def zipped(name: str, data: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, data)
    return out.getvalue()


def decide(policy: CheckPolicy, raw: bytes, prof, envelope: Envelope = ENVELOPE):
    return asyncio.run(policy.decide(raw, envelope, prof))


def headers(verdict) -> dict[str, str]:
    return {name: " ".join(value.split()) for name, value in verdict.headers}


# -- without daemons ----------------------------------------------------------------------


def test_clean_message_passes_with_scanned_and_spam_headers():
    verdict = decide(CheckPolicy(), message(), BUILTIN_DEFAULT_PROFILE)
    assert (verdict.category, verdict.destiny) == (None, "pass")
    fields = headers(verdict)
    assert fields["X-Virus-Scanned"] == "spamviewer"
    assert fields["X-Spam-Status"].startswith("No, score=0.0 required=6.3")
    assert fields["X-Spam-Score"] == "0.000"
    assert verdict.message is None


def test_eicar_in_a_plain_part_is_a_virus_for_the_builtin_signatures():
    raw = message("Here:\n" + eicar().decode() + "\n")
    verdict = decide(CheckPolicy(), raw, profile(f"virus_scan=1,{SIGS}\nvirus_destiny=discard\n"))
    assert (verdict.category, verdict.destiny) == ("VIRUS", "discard")
    assert verdict.summary.startswith("INFECTED: ")
    alert = dict(verdict.quarantine_headers)["X-Amavis-Alert"]
    assert alert.startswith("INFECTED, message contains virus: ")
    assert "score=x" in dict(verdict.quarantine_headers)["X-Spam-Status"]


def test_virus_beats_banned_beats_spam_beats_bad_header():
    text = (f"virus_scan=1,{SIGS}\nfilename_reject=1,.exe\nbody_rejecti=5,cheap pills\n"
            "reject_score=5\n")
    prof = profile(text)
    exe = ("setup.exe", b"MZ" + b"\0" * 200, "application/octet-stream")
    everything = message("cheap pills " + eicar().decode(), attachments=(exe,))
    everything = everything.replace(b"Subject: hello", b"Subject: caf\xc3\xa9 8bit")
    assert decide(CheckPolicy(), everything, prof).category == "VIRUS"
    banned_spam_badh = message("cheap pills", attachments=(exe,)).replace(
        b"Subject: hello", b"Subject: caf\xc3\xa9")
    assert decide(CheckPolicy(), banned_spam_badh, prof).category == "BANNED"
    spam_badh = message("cheap pills").replace(b"Subject: hello", b"Subject: caf\xc3\xa9")
    assert decide(CheckPolicy(), spam_badh, prof).category == "SPAM"
    assert decide(CheckPolicy(), message().replace(b"Subject: hello", b"Subject: caf\xc3\xa9"),
                  prof).category == "BADH"


def test_exe_inside_a_zip_is_banned_and_the_alert_names_it():
    attachment = ("invoice.zip", zipped("invoice.exe", b"MZ" + b"\0" * 100), "application/zip")
    verdict = decide(CheckPolicy(), message(attachments=(attachment,)), BUILTIN_DEFAULT_PROFILE)
    assert (verdict.category, verdict.destiny) == ("BANNED", "bounce")
    alerts = [v for n, v in verdict.quarantine_headers if n == "X-Amavis-Alert"]
    assert alerts and all(a.startswith("BANNED, message contains ") for a in alerts)
    assert any("invoice.exe" in a for a in alerts)
    assert verdict.summary.startswith("BANNED: ")


def test_banned_names_in_archives_pass_when_the_profile_allows_them():
    prof = profile("filename_reject=1,.exe\nallow_banned_in_archives=1\n")
    attachment = ("tools.zip", zipped("tool.exe", b"just text"), "application/zip")
    assert decide(CheckPolicy(), message(attachments=(attachment,)), prof).category is None


def test_score_below_reject_score_is_delivered_naming_the_failed_tests():
    prof = profile("reject_score=5\nbody_rejecti=2,special offer\nsubject_tag=[SPAM]\n")
    verdict = decide(CheckPolicy(), message("A special offer for you"), prof)
    assert (verdict.category, verdict.destiny) == (None, "pass")
    status = headers(verdict)["X-Spam-Status"]
    assert status.startswith("No, score=2.0 required=5.0") and "body_rejecti" in status
    assert headers(verdict)["X-Spam-Level"] == "**"
    assert verdict.message is None


def test_passed_spam_gets_the_subject_tag_and_yes_in_its_status():
    prof = profile("reject_score=2\nbody_rejecti=2,special offer\nsubject_tag=[SPAM]\n")
    verdict = decide(CheckPolicy(), message("A special offer for you"), prof)
    assert (verdict.category, verdict.destiny) == ("SPAM", "pass")
    assert headers(verdict)["X-Spam-Status"].startswith("Yes, score=2.0")
    assert b"\r\nSubject: [SPAM] hello\r\n" in verdict.message


def test_tag_subject_adds_a_subject_when_there_is_none():
    assert tag_subject(b"From: a@b\r\n\r\nbody\r\n", "[SPAM]") == (
        b"Subject: [SPAM]\r\nFrom: a@b\r\n\r\nbody\r\n")


def test_spam_quarantine_fields_carry_flag_score_and_tests():
    prof = profile("reject_score=2\nheader_rejecti=3,Subject:win\nspam_destiny=discard\n")
    verdict = decide(CheckPolicy(), message(subject="You WIN"), prof)
    assert (verdict.category, verdict.destiny, verdict.summary) == ("SPAM", "discard", "spam")
    fields = dict(verdict.quarantine_headers)
    assert fields["X-Spam-Flag"] == "YES"
    assert fields["X-Spam-Score"] == "3.000"
    assert fields["X-Spam-Status"].startswith("Yes, score=3.000")
    assert "tests=[header_rejecti=3]" in fields["X-Spam-Status"]


def test_bad_header_is_badh_and_passes_by_default_with_an_alert():
    raw = message().replace(b"Subject: hello", b"Subject: caf\xc3\xa9")
    verdict = decide(CheckPolicy(), raw, BUILTIN_DEFAULT_PROFILE)
    assert (verdict.category, verdict.destiny) == ("BADH", "pass")
    assert headers(verdict)["X-Amavis-Alert"].startswith("BAD HEADER SECTION, 8bit-in-header")


def test_mime_strip_removes_html_and_a_message_with_nothing_left_is_refused():
    mail = EmailMessage()
    mail["Subject"] = "both"
    mail.set_content("plain text")
    mail.add_alternative("<p>html</p>", subtype="html")
    raw = mail.as_bytes(policy=mail.policy.clone(linesep="\r\n"))
    prof = profile("mime_strip=text/html\n")
    verdict = decide(CheckPolicy(), raw, prof)
    assert verdict.destiny == "pass" and b"text/html" not in verdict.message
    assert b"plain text" in verdict.message
    only_html = profile("mime_allow=image/png\n")
    refused = decide(CheckPolicy(), raw, only_html)
    assert (refused.category, refused.destiny) == (None, "reject")
    assert strip_parts(raw, strip=("image",)) == (None, False)


def test_profile_reject_refuses_without_looking():
    verdict = decide(CheckPolicy(), message(), profile("reject=1\n", name="closed"))
    assert verdict.destiny == "reject" and "profile closed rejects all mail" in verdict.summary


def test_dns_checks_hook_adds_its_spam_findings():
    async def dns(parsed, envelope, prof):
        return [Finding("SPAM", "dnsbl", 4.0, "listed"), Finding("VIRUS", "ignored", 1.0)]

    prof = profile("reject_score=3\n")
    verdict = decide(CheckPolicy(dns_checks=dns), message(), prof)
    assert verdict.category == "SPAM"


def test_stats_count_categories_defects_and_banned_kinds():
    policy = CheckPolicy()
    raw = message(attachments=(("a.exe", b"text", "application/octet-stream"),)).replace(
        b"Subject: hello", b"Subject: caf\xc3\xa9")
    decide(policy, raw, BUILTIN_DEFAULT_PROFILE)
    decide(policy, message(), BUILTIN_DEFAULT_PROFILE)
    assert policy.stats.get("verdicts", "BANNED") == 1
    assert policy.stats.get("verdicts", "CLEAN") == 1
    assert policy.stats.get("badh_defects", "8bit-in-header") == 1
    assert policy.stats.get("banned_reasons", "filename-reject") == 1


def test_checks_out_of_time_are_a_temporary_failure():
    async def slow(parsed, envelope, prof):
        await asyncio.sleep(5)
        return []

    with pytest.raises(TemporaryFailure) as failure:
        decide(CheckPolicy(dns_checks=slow, timeout=0.2), message(), BUILTIN_DEFAULT_PROFILE)
    assert failure.value.label == "check_timeout"


def _record_analysis(monkeypatch, probe) -> list:
    """What `probe()` returns each time the checks analyse a message."""
    import mailfilter.policy as policy_module

    seen = []
    analyse = policy_module._analyse

    def recording(*args):
        seen.append(probe())
        return analyse(*args)

    monkeypatch.setattr(policy_module, "_analyse", recording)
    return seen


def test_small_messages_are_checked_on_the_loop_and_large_ones_in_a_thread(monkeypatch):
    import threading

    threads = _record_analysis(monkeypatch, threading.current_thread)
    policy = CheckPolicy(inline_limit=4096)
    small = message()
    assert len(small) < 4096
    decide(policy, small, BUILTIN_DEFAULT_PROFILE)
    decide(CheckPolicy(inline_limit=len(small)), small, BUILTIN_DEFAULT_PROFILE)
    assert threads[0] is threading.main_thread()
    assert threads[1] is not threading.main_thread()
    assert CheckPolicy().inline_limit == 256 * 1024


def test_checks_with_nothing_to_wait_for_run_in_the_callers_task(monkeypatch):
    tasks = _record_analysis(monkeypatch, asyncio.current_task)

    async def no_findings(parsed, envelope, prof):
        return []

    async def run(policy: CheckPolicy):
        verdict = await policy.decide(message(), ENVELOPE, BUILTIN_DEFAULT_PROFILE)
        return verdict, asyncio.current_task()

    verdict, caller = asyncio.run(run(CheckPolicy()))
    assert verdict.destiny == "pass" and tasks == [caller]
    # With a DNS hook there is something to wait for, and the timeout's task runs it.
    verdict, caller = asyncio.run(run(CheckPolicy(dns_checks=no_findings)))
    assert verdict.destiny == "pass" and tasks[1] is not caller


def test_a_bad_profile_stops_the_start_naming_file_and_line(tmp_path):
    (tmp_path / "Medium").write_text("reject_score=5\nfilename_reject=\n")
    with pytest.raises(ProfileError) as error:
        FilterChecks(FilterConfig(profile_dir=str(tmp_path)))
    assert f"{tmp_path / 'Medium'}:2:" in str(error.value)


def test_profile_choice_by_special_users_and_the_relay_profile(tmp_path):
    for name, text in (("Medium", "reject_score=5\n"), ("Strict", "reject_score=2\n"),
                       ("Relay", "reject_score=10\n")):
        (tmp_path / name).write_text(text)
    special = tmp_path.parent / "special_users"
    special.write_text("boss@example.test Strict\n@strict.test Strict\n")
    checks = FilterChecks(FilterConfig(profile_dir=str(tmp_path), special_users=str(special)))
    chosen = [asyncio.run(checks.lookup.profile_for(a)).name
              for a in ("boss@example.test", "x@strict.test", "alice@example.test")]
    assert chosen == ["Strict", "Strict", "Medium"]
    assert checks.lookup.relay_profile().name == "Relay"


# -- real clamd and spamd -------------------------------------------------------------------

NO_SIGNATURES = parse_profile("virus_destiny=discard\n", name="clamd-only")


def clamd_policy(daemon, **options) -> CheckPolicy:
    return CheckPolicy(clamd=ClamdClient(host=daemon.host, port=daemon.port, timeout=10),
                       **options)


def test_clamd_finds_eicar_in_a_plain_part(clamd):
    verdict = decide(clamd_policy(clamd), message("x\n" + eicar().decode() + "\n"),
                     NO_SIGNATURES)
    assert verdict.category == "VIRUS"
    assert "Eicar-Test-Signature" in verdict.summary


@pytest.mark.parametrize("nesting", [1, 2], ids=["zip", "zip-in-zip"])
def test_clamd_finds_eicar_in_a_zip(clamd, nesting):
    data = zipped("eicar.txt", eicar())
    if nesting == 2:
        data = zipped("inner.zip", data)
    raw = message(attachments=(("a.zip", data, "application/zip"),))
    verdict = decide(clamd_policy(clamd), raw, NO_SIGNATURES)
    assert (verdict.category, verdict.destiny) == ("VIRUS", "discard")
    assert dict(verdict.quarantine_headers)["X-Amavis-Alert"].startswith(
        "INFECTED, message contains virus: Eicar-Test-Signature")


def test_clamd_down_is_a_temporary_failure_never_clean():
    policy = CheckPolicy(clamd=ClamdClient(port=free_port(), timeout=2))
    with pytest.raises(TemporaryFailure) as failure:
        decide(policy, message(), NO_SIGNATURES)
    assert failure.value.label == "virus_scan"
    assert policy.stats.get("scanner_errors", "clamd") == 1


def test_clamd_down_with_pass_with_header_delivers_marked_unscanned():
    policy = CheckPolicy(clamd=ClamdClient(port=free_port(), timeout=2),
                         virus_scan_fail="pass-with-header")
    verdict = decide(policy, message(), NO_SIGNATURES)
    assert verdict.destiny == "pass"
    assert headers(verdict)["X-Virus-Status"] == "Unscanned, reason=error"


def test_clamd_down_with_quarantine_holds_the_message_as_unchecked():
    policy = CheckPolicy(clamd=ClamdClient(port=free_port(), timeout=2),
                         virus_scan_fail="quarantine")
    verdict = decide(policy, message(), NO_SIGNATURES)
    assert (verdict.category, verdict.destiny) == ("VIRUS", "discard")
    assert "UNCHECKED" in verdict.summary


def test_gtube_through_real_spamd_is_spam(spamd):
    policy = CheckPolicy(spamd=SpamdClient(host=spamd.host, port=spamd.port, timeout=20))
    prof = profile("reject_score=5\nspamassassin=1\nspam_destiny=discard\n")
    verdict = decide(policy, message("Test\n" + GTUBE.decode() + "\n"), prof)
    assert (verdict.category, verdict.destiny) == ("SPAM", "discard")
    status = dict(verdict.quarantine_headers)["X-Spam-Status"]
    assert "GTUBE" in status and status.startswith("Yes, score=")


def test_spamd_is_not_asked_about_messages_over_spam_max_size(spamd):
    policy = CheckPolicy(spamd=SpamdClient(host=spamd.host, port=spamd.port, timeout=20))
    prof = profile("reject_score=5\nspamassassin=1\nspam_max_size=100\n")
    verdict = decide(policy, message("Test\n" + GTUBE.decode() + "\n"), prof)
    assert (verdict.category, verdict.destiny) == (None, "pass")
    assert headers(verdict)["X-Spam-Status"] == "Unscanned, reason=oversize"


def test_builtin_default_profile_is_medium_like():
    assert BUILTIN_DEFAULT_PROFILE.reject_score == 6.31
    assert Path(BUILTIN_DEFAULT_PROFILE.virus_scan[0].value).name == "default.sigs"
