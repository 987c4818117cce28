"""MessageWall profile files: syntax, every variable and its default, refusals, choice."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest

from mailfilter.profiles import (
    BUILTIN_SIGNATURES,
    DnsList,
    Profile,
    ProfileError,
    ProfileSet,
    Scored,
    load_profiles,
    parse_profile,
)

SHIPPED = Path(__file__).resolve().parents[2] / "profiles"


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


def parse(text: str) -> Profile:
    return parse_profile(text, name="test")


def refusal(directory: Path, text: str) -> ProfileError:
    write(directory, "Bad", text)
    with pytest.raises(ProfileError) as caught:
        load_profiles(directory)
    return caught.value


# --- defaults --------------------------------------------------------------------------


def test_a_profile_that_sets_one_variable_has_messagewalls_defaults_for_the_rest():
    profile = parse("reject=0\n")
    assert profile.reject is False
    assert profile.reject_score == 1
    assert profile.mime_strip == () and profile.mime_allow == ()
    for check in ("to_cc_check", "from_check", "realname_check", "rdns_required", "rmx_required"):
        assert getattr(profile, check) == Scored(1.0, False)
    for rules in (
        "header_reject",
        "header_rejecti",
        "body_reject",
        "body_rejecti",
        "filename_reject",
        "mime_reject",
        "dnsbl",
        "dnsbl_domain",
        "dnsdcc",
        "virus_scan",
    ):
        assert getattr(profile, rules) == ()


def test_destinies_default_to_the_appliances_answers():
    profile = parse("reject=0\n")
    assert profile.destiny("SPAM") == "pass"
    assert profile.destiny("VIRUS") == "bounce"
    assert profile.destiny("BANNED") == "bounce"
    assert profile.destiny("BADH") == "pass"


def test_our_added_variables_have_their_documented_defaults():
    profile = parse("reject=0\n")
    assert profile.spamassassin == 0
    assert profile.spam_max_size == 524288
    assert profile.allow_banned_in_archives is False
    assert profile.subject_tag == ""


# --- regular variables ------------------------------------------------------------------


def test_reject_one_refuses_all_mail_of_the_profile():
    assert parse("reject=1\n").reject is True


def test_reject_score_is_read_as_a_number():
    assert parse("reject_score=6.31\n").reject_score == pytest.approx(6.31)


def test_mime_strip_and_mime_allow_collect_every_line_lower_cased():
    profile = parse("mime_strip=text/HTML\nmime_strip=application/x-wav\nmime_allow=text/plain\n")
    assert profile.mime_strip == ("text/html", "application/x-wav")
    assert profile.mime_allow == ("text/plain",)


def test_destiny_variables_accept_the_four_destinies():
    profile = parse(
        "virus_destiny=reject\nbanned_destiny=discard\nspam_destiny=bounce\nbadh_destiny=pass\n"
    )
    assert (profile.virus_destiny, profile.banned_destiny) == ("reject", "discard")
    assert (profile.spam_destiny, profile.badh_destiny) == ("bounce", "pass")


def test_spamassassin_weight_size_archives_and_subject_tag_are_typed():
    profile = parse(
        "spamassassin=0.5\nspam_max_size=1000\nallow_banned_in_archives=1\nsubject_tag=[SPAM]\n"
    )
    assert profile.spamassassin == 0.5
    assert profile.spam_max_size == 1000
    assert profile.allow_banned_in_archives is True
    assert profile.subject_tag == "[SPAM]"


# --- scored variables -------------------------------------------------------------------


def test_a_scored_variable_without_a_score_scores_one():
    profile = parse("body_rejecti=viagra\n")
    assert profile.body_rejecti == (Scored(1.0, "viagra"),)


def test_a_scored_variable_takes_the_score_before_the_first_comma():
    profile = parse("header_reject=3,Precedence:bulk\n")
    rule = profile.header_reject[0]
    assert rule.score == 3
    assert (rule.value.header, rule.value.key) == ("Precedence", "bulk")


def test_a_value_with_a_comma_keeps_everything_after_the_score():
    profile = parse("body_reject=2,FREE, NOW\n")
    assert profile.body_reject == (Scored(2.0, "FREE, NOW"),)


def test_flags_are_scored_switches():
    profile = parse("to_cc_check=1\nfrom_check=4,1\nrealname_check=2,0\n")
    assert profile.to_cc_check == Scored(1.0, True)
    assert profile.from_check == Scored(4.0, True)
    assert profile.realname_check == Scored(2.0, False)


def test_rdns_and_rmx_required_are_scored_switches():
    profile = parse("rdns_required=1\nrmx_required=5,1\n")
    assert profile.rdns_required == Scored(1.0, True)
    assert profile.rmx_required == Scored(5.0, True)


def test_header_rejecti_key_between_slashes_is_a_case_insensitive_expression():
    profile = parse("header_rejecti=1,Subject:/^urgent/\n")
    pattern = profile.header_rejecti[0].value.pattern
    assert pattern is not None and pattern.search("URGENT notice")


def test_filename_and_mime_reject_are_scored_lists():
    profile = parse(
        "filename_reject=1,.pif\nfilename_reject=2,.scr\nmime_reject=application/X-Wav\n"
    )
    assert profile.filename_reject == (Scored(1.0, ".pif"), Scored(2.0, ".scr"))
    assert profile.mime_reject == (Scored(1.0, "application/x-wav"),)


def test_dnsbl_lines_keep_their_zone_and_expected_answer():
    profile = parse("dnsbl=2,list.dsbl.org/127.0.0.2\ndnsbl=1,bl.spamcop.net\n")
    assert profile.dnsbl == (
        Scored(2.0, DnsList("list.dsbl.org", ipaddress.IPv4Address("127.0.0.2"))),
        Scored(1.0, DnsList("bl.spamcop.net", None)),
    )


def test_dnsbl_domain_and_dnsdcc_are_read():
    profile = parse("dnsbl_domain=2,postmaster.rfc-ignorant.org\ndnsdcc=1,aa.dcc.dsbl.org\n")
    assert profile.dnsbl_domain == (Scored(2.0, DnsList("postmaster.rfc-ignorant.org")),)
    assert profile.dnsdcc == (Scored(1.0, "aa.dcc.dsbl.org"),)


def test_virus_scan_finds_a_file_next_to_the_profiles_first(tmp_path):
    write(tmp_path, ".mine.sigs", "Test-Sig=text:abcdefgh\n")
    write(tmp_path, "P", "virus_scan=2,.mine.sigs\n")
    profile = load_profiles(tmp_path)["P"]
    assert profile.virus_scan == (Scored(2.0, (tmp_path / ".mine.sigs").resolve()),)


def test_virus_scan_falls_back_to_the_builtin_signature_files():
    profile = parse("virus_scan=1,default.sigs\n")
    assert profile.virus_scan[0].value == (BUILTIN_SIGNATURES / "default.sigs").resolve()


def test_comments_and_blank_lines_are_ignored_and_values_keep_inner_spaces():
    profile = parse(
        "# a comment\n\n   # indented comment\nheader_rejecti=1,X-Mailer:Microsoft CDO\n"
    )
    assert profile.header_rejecti[0].value.key == "Microsoft CDO"


def test_crlf_line_endings_are_accepted():
    assert parse("reject_score=5\r\nreject=1\r\n").reject_score == 5


# --- refusals ---------------------------------------------------------------------------


def test_an_unknown_variable_is_refused_with_file_and_line(tmp_path):
    error = refusal(tmp_path, "reject=0\n\nrejct_score=5\n")
    assert (error.path, error.line) == (str(tmp_path / "Bad"), 3)
    assert "unknown variable 'rejct_score'" in str(error)
    assert str(error).startswith(f"{tmp_path / 'Bad'}:3: ")


def test_a_bad_score_is_refused_with_its_line(tmp_path):
    error = refusal(tmp_path, "header_reject=x,Precedence:bulk\n")
    assert error.line == 1 and "score" in error.reason


def test_a_value_with_a_comma_but_no_score_is_refused(tmp_path):
    error = refusal(tmp_path, "reject=0\nbody_reject=FREE, NOW\n")
    assert error.line == 2 and "needs a score" in error.reason


def test_a_line_without_equals_sign_is_refused(tmp_path):
    error = refusal(tmp_path, "reject=0\nthis is not a setting\n")
    assert error.line == 2 and "name=value" in error.reason


@pytest.mark.parametrize(
    "line, words",
    [
        ("reject=yes", "0 or 1"),
        ("to_cc_check=2", "0 or 1"),
        ("reject_score=five", "number"),
        ("reject_score=nan", "number"),
        ("spam_destiny=quarantine", "pass, discard, bounce, reject"),
        ("spamassassin=-1", "weight"),
        ("spam_max_size=512k", "size"),
        ("header_reject=1,Precedence", "Header:Key"),
        ("header_reject=1,Precedence:", "empty key"),
        ("header_rejecti=1,Subject:/(/", "regular expression"),
        ("dnsbl=1,list.dsbl.org/localhost", "IPv4"),
        ("dnsbl=1,not a zone", "DNS zone"),
        ("mime_strip=text html", "MIME type"),
        ("virus_scan=1,no-such-file.sigs", "not found"),
        ("body_reject=1,", "empty value"),
    ],
)
def test_a_value_that_does_not_parse_is_refused(tmp_path, line, words):
    error = refusal(tmp_path, f"reject=0\n{line}\n")
    assert error.line == 2 and words in error.reason


def test_a_control_character_in_a_value_is_refused(tmp_path):
    error = refusal(tmp_path, "reject=0\nsubject_tag=[SPAM]\rBcc: x@example.org\n")
    assert error.line == 2 and "control character" in error.reason


def test_a_single_valued_variable_set_twice_is_refused(tmp_path):
    error = refusal(tmp_path, "reject_score=5\nreject_score=6\n")
    assert error.line == 2 and "set twice" in error.reason


def test_a_file_that_sets_nothing_is_refused(tmp_path):
    error = refusal(tmp_path, "# only a comment\n")
    assert "at least one variable" in error.reason


def test_a_file_that_is_not_utf8_is_refused_with_its_line(tmp_path):
    (tmp_path / "Bad").write_bytes(b"reject=0\nbody_reject=caf\xe9\n")
    with pytest.raises(ProfileError) as caught:
        load_profiles(tmp_path)
    assert caught.value.line == 2


def test_one_bad_file_refuses_the_whole_directory(tmp_path):
    write(tmp_path, "Good", "reject=0\n")
    write(tmp_path, "Worse", "bogus=1\n")
    with pytest.raises(ProfileError, match="Worse:1"):
        load_profiles(tmp_path)


def test_hidden_files_and_subdirectories_are_not_profiles(tmp_path):
    write(tmp_path, "Good", "reject=0\n")
    write(tmp_path, ".Good.swp", "\x00garbage")
    (tmp_path / "archive").mkdir()
    assert list(load_profiles(tmp_path)) == ["Good"]


# --- the shipped examples -----------------------------------------------------------------


def test_every_shipped_example_profile_loads():
    profiles = load_profiles(SHIPPED)
    expected = {"None", "Light", "Medium", "Strong", "Extreme", "Reject", "Relay", "Warning"}
    assert set(profiles) == expected
    assert profiles["Reject"].reject is True
    assert profiles["Medium"].reject_score == pytest.approx(6.31)
    assert profiles["Extreme"].to_cc_check.value is True
    assert profiles["Relay"].to_cc_check.value is False and profiles["Relay"].dnsbl == ()
    assert all(profile.virus_scan for name, profile in profiles.items() if name not in
               ("None", "Reject"))


def test_shipped_block_lists_name_the_answer_so_resolver_errors_do_not_count():
    for profile in load_profiles(SHIPPED).values():
        for rule in (*profile.dnsbl, *profile.dnsbl_domain):
            assert rule.value.answer is not None, (profile.name, rule)


# --- choice and reload --------------------------------------------------------------------


@pytest.fixture
def profile_dir(tmp_path):
    directory = tmp_path / "profiles"
    directory.mkdir()
    for name in ("Medium", "Relay", "Strong", "Reject", "Medium Plus"):
        write(directory, name, f"# {name}\nreject_score=5\n")
    return directory


def special(tmp_path, text: str) -> Path:
    return write(tmp_path, "special_users", text)


def test_recipients_not_listed_get_the_default_profile(profile_dir, tmp_path):
    profiles = ProfileSet.load(profile_dir, default_profile="Medium")
    assert profiles.choose_profile("anyone@example.org", client_ip="192.0.2.1").name == "Medium"


def test_special_users_name_a_profile_by_address_before_domain(profile_dir, tmp_path):
    users = special(
        tmp_path,
        "# address or domain, then the profile\n"
        "ceo@Example.org   Reject\n"
        "example.org Strong\n"
        "@example.net Medium Plus\n",
    )
    profiles = ProfileSet.load(profile_dir, special_users=users)
    assert profiles.choose_profile("<CEO@example.org>", client_ip="192.0.2.1").name == "Reject"
    assert profiles.choose_profile("sales@example.org", client_ip="192.0.2.1").name == "Strong"
    assert profiles.choose_profile("x@example.net", client_ip="192.0.2.1").name == "Medium Plus"
    assert profiles.choose_profile("x@sub.example.org", client_ip="192.0.2.1").name == "Medium"


def test_mail_from_relay_ips_or_authenticated_clients_gets_the_relay_profile(profile_dir):
    profiles = ProfileSet.load(profile_dir, relay_ips=("10.0.0.0/8", "2001:db8::/32"))
    assert profiles.choose_profile("out@example.com", client_ip="10.1.2.3").name == "Relay"
    assert profiles.choose_profile("out@example.com", client_ip="::ffff:10.1.2.3").name == "Relay"
    assert profiles.choose_profile("out@example.com", client_ip="2001:db8::5").name == "Relay"
    assert profiles.choose_profile("in@example.com", client_ip="192.0.2.9").name == "Medium"
    assert (
        profiles.choose_profile("out@example.com", client_ip="192.0.2.9", authenticated=True).name
        == "Relay"
    )


def test_a_special_users_line_naming_an_unknown_profile_is_refused(profile_dir, tmp_path):
    users = special(tmp_path, "a@example.org Medium\nb@example.org Nonesuch\n")
    with pytest.raises(ProfileError) as caught:
        ProfileSet.load(profile_dir, special_users=users)
    assert caught.value.path == str(users) and caught.value.line == 2


def test_a_default_profile_that_does_not_exist_is_refused(profile_dir):
    with pytest.raises(ProfileError, match="default_profile 'Nonesuch'"):
        ProfileSet.load(profile_dir, default_profile="Nonesuch")


def test_reload_picks_up_changed_profiles(profile_dir):
    profiles = ProfileSet.load(profile_dir)
    write(profile_dir, "Medium", "reject_score=9\n")
    profiles.reload()
    assert profiles["Medium"].reject_score == 9


def test_reload_keeps_the_old_profiles_when_a_new_file_does_not_parse(profile_dir):
    profiles = ProfileSet.load(profile_dir)
    write(profile_dir, "Medium", "reject_score=9\n")
    write(profile_dir, "Broken", "reject_score=\n")
    with pytest.raises(ProfileError, match="Broken:1"):
        profiles.reload()
    assert profiles["Medium"].reject_score == 5
    assert "Broken" not in profiles.profiles


def test_reload_keeps_the_old_profiles_when_special_users_breaks(profile_dir, tmp_path):
    users = special(tmp_path, "a@example.org Strong\n")
    profiles = ProfileSet.load(profile_dir, special_users=users)
    special(tmp_path, "a@example.org Gone\n")
    with pytest.raises(ProfileError):
        profiles.reload()
    assert profiles.choose_profile("a@example.org", client_ip="192.0.2.1").name == "Strong"


def test_signature_files_lists_what_profiles_name(tmp_path):
    write(tmp_path, "A", "virus_scan=1,default.sigs\n")
    write(tmp_path, "Medium", "reject=0\n")
    write(tmp_path, "Relay", "reject=0\n")
    profiles = ProfileSet.load(tmp_path)
    assert profiles.signature_files() == {(BUILTIN_SIGNATURES / "default.sigs").resolve()}


def test_profiles_and_checks_import_no_django():
    code = (
        "import sys, mailfilter.profiles, mailfilter.checks.rules, mailfilter.checks.virus,"
        " mailfilter.checks.clamd, mailfilter.checks.spamd;"
        " sys.exit('django' in sys.modules)"
    )
    root = Path(__file__).resolve().parents[2]
    assert subprocess.run([sys.executable, "-c", code], cwd=root).returncode == 0
