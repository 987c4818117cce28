"""`manage.py configure`: the appliance's setup questions, answered through stdin or flags,
written to a `.env` file and the default profile in a directory of the test's own."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from dotenv import dotenv_values

from mailfilter.profiles import ProfileSet, read_profile
from spamviewer.setup_wizard import read_env_file, update_env_text
from tests.directory.slapd import SUFFIX, SYNC_DN, SYNC_PW, start_slapd

ROOT = Path(__file__).resolve().parent.parent

EXISTING_ENV = """# my settings
DEBUG=False
QUARANTINE_MAX_SIZE_MB=100

# keep this comment
TIME_ZONE=Europe/Vienna
"""

# Every question in order, Exchange integration off; the spam level is answered wrongly
# once and asked again.
ANSWERS = [
    "D_DISCARD",          # spam destiny
    "",                   # virus destiny [bounce]
    "reject",             # banned destiny
    "",                   # bad header destiny [pass]
    "lots",               # spam level: not a number, asked again
    "7.5",
    "yes",                # banned inside archives
    "",                   # spam max size [524288]
    "250",                # quarantine MB
    "",                   # web viewer [yes]
    "no",                 # Exchange
    "Example.com, example.org",
    "mail.example.com:2525",
    "",                   # Configuration OK? [Yes]
]


@pytest.fixture
def place(tmp_path, settings, monkeypatch):
    """A .env file with lines of its own, and an empty var dir for the profiles."""
    for name in ("PROFILE_DIR", "FILTER_DEFAULT_PROFILE", "LDAP_CA_FILE"):
        monkeypatch.delenv(name, raising=False)
    settings.VAR_DIR = tmp_path / "var"
    settings.LDAP_CA_FILE = ""
    env = tmp_path / ".env"
    env.write_text(EXISTING_ENV)
    os.chmod(env, 0o644)
    return tmp_path


def configure(place: Path, *args: str, answers: list[str] | None = None) -> str:
    out = io.StringIO()
    stdin = io.StringIO("".join(f"{a}\n" for a in answers or []))
    call_command("configure", "--env-file", str(place / ".env"), *args, stdin=stdin,
                 stdout=out)
    return out.getvalue()


def profile_of(place: Path) -> Path:
    return place / "var" / "profiles" / "Medium"


UNATTENDED = {
    "--spam-destiny": "pass", "--virus-destiny": "bounce", "--banned-destiny": "discard",
    "--badh-destiny": "D_PASS", "--spam-level": "5", "--allow-banned-in-archives": "no",
    "--spam-max-size": "300000", "--quarantine-max-size-mb": "800", "--web-viewer": "no",
    "--exchange": "no", "--relay-domains": "company.com", "--next-hop": "mail.company.local",
}


def unattended(*, without: tuple[str, ...] = (), **changes: str) -> list[str]:
    """--no-input and the flags above; `changes` as `ldap_server="..."`."""
    flags = {**UNATTENDED, **{"--" + k.replace("_", "-"): v for k, v in changes.items()}}
    args = ["--no-input"]
    for flag, value in flags.items():
        if flag not in without:
            args += [flag, value]
    return args


def test_answers_typed_in_are_written_to_env_and_profile(place):
    output = configure(place, answers=ANSWERS)

    assert "'lots' is not a number (for example 6.31). Please answer again." in output
    assert output.count("Spam level: the score at which a message is spam [6.31]:") == 2
    review = output[output.index("Review:"):]
    for line in ("Spam destiny: discard", "Virus destiny: bounce", "Banned destiny: reject",
                 "Bad header destiny: pass", "Spam level: 7.5",
                 "Allow banned inside archives: yes",
                 "Max message size to scan for spam: 524288",
                 "Quarantine size limit (MB): 250", "Use web quarantine viewer: yes",
                 "Use Exchange: no", "Relay domains: example.com, example.org",
                 "Destination mail server: mail.example.com:2525"):
        assert line in review
    assert "Configuration OK? (Yes/No) [Yes]:" in review

    env_file = place / ".env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    text = env_file.read_text()
    assert text.startswith("# my settings\nDEBUG=False\nQUARANTINE_MAX_SIZE_MB=250\n\n"
                           "# keep this comment\nTIME_ZONE=Europe/Vienna\n")
    values = read_env_file(env_file)
    assert values["QUARANTINE_MAX_SIZE_MB"] == "250"
    assert values["WEB_VIEWER"] == "True"
    assert values["LOGIN_METHOD"] == "local"
    assert values["LDAP_SERVER"] == ""
    assert values["RELAY_DOMAINS"] == "example.com,example.org"
    assert values["RELAY_NEXT_HOP"] == "mail.example.com:2525"
    assert values["PROFILE_DIR"] == str(place / "var" / "profiles")

    profile = read_profile(profile_of(place))
    assert (profile.spam_destiny, profile.virus_destiny, profile.banned_destiny,
            profile.badh_destiny) == ("discard", "bounce", "reject", "pass")
    assert profile.reject_score == 7.5
    assert profile.allow_banned_in_archives is True
    assert profile.spam_max_size == 524288
    # The example's other lines are still there, and the directory loads as a whole.
    assert any(rule.value == ".exe" for rule in profile.filename_reject)
    assert profile.subject_tag == "[SPAM]"
    ProfileSet.load(place / "var" / "profiles", default_profile="Medium")
    assert not list((place / "var" / "profiles").glob(".*"))


def test_a_second_run_offers_the_previous_answers(place):
    configure(place, answers=ANSWERS)
    before_env = (place / ".env").read_text()
    before_profile = profile_of(place).read_text()

    output = configure(place, answers=[""] * 13)

    for prompt in ("[discard]:", "[reject]:", "[7.5]:", "archive (zip, gz, bz2, tar, tgz, "
                   "tbz)? (yes/no) [yes]:", "(0 = no limit) [250]:",
                   "(yes/no) [no]:", "(comma-separated) [example.com, example.org]:",
                   "[mail.example.com:2525]:"):
        assert prompt in output
    assert (place / ".env").read_text() == before_env
    assert profile_of(place).read_text() == before_profile


def test_answering_no_at_the_review_asks_again_with_the_new_answers_as_defaults(place):
    answers = ANSWERS[:-1] + ["no"] + [""] * 3 + ["bounce"] + [""] * 8 + ["yes"]
    output = configure(place, answers=answers)

    assert output.count("Review:") == 2
    assert "Spam destiny: discard" in output.split("Review:")[1]
    second = output.split("Configuration OK?")[1]
    assert "Spam level: the score at which a message is spam [7.5]:" in second
    assert read_profile(profile_of(place)).badh_destiny == "bounce"


def test_unattended_flags_answer_everything(place):
    output = configure(place, *unattended())

    assert "Review:" in output and "Configuration OK?" not in output
    profile = read_profile(profile_of(place))
    assert (profile.spam_destiny, profile.virus_destiny, profile.banned_destiny,
            profile.badh_destiny) == ("pass", "bounce", "discard", "pass")
    assert (profile.reject_score, profile.spam_max_size) == (5.0, 300000)
    assert profile.allow_banned_in_archives is False
    values = read_env_file(place / ".env")
    assert values["QUARANTINE_MAX_SIZE_MB"] == "800"
    assert values["WEB_VIEWER"] == "False"
    assert values["RELAY_DOMAINS"] == "company.com"
    assert values["RELAY_NEXT_HOP"] == "mail.company.local"


def test_unattended_defaults_fill_what_has_a_default(place):
    configure(place, "--no-input", "--exchange", "no", "--relay-domains", "company.com",
              "--next-hop", "mail.company.local")
    profile = read_profile(profile_of(place))
    assert (profile.spam_destiny, profile.virus_destiny, profile.banned_destiny,
            profile.badh_destiny, profile.reject_score) == (
        "pass", "bounce", "bounce", "pass", 6.31)
    assert read_env_file(place / ".env")["QUARANTINE_MAX_SIZE_MB"] == "100"


@pytest.mark.parametrize(("flag", "value", "reason"), [
    ("--spam-destiny", "maybe", "is not a destiny"),
    ("--spam-level", "-1", "must be a number above 0"),
    ("--web-viewer", "perhaps", "answer yes or no"),
    ("--relay-domains", "not a domain!", "is not a domain name"),
    ("--next-hop", "mail.example.com:99999", "the port must be a number"),
])
def test_no_input_with_a_bad_flag_fails_naming_it(place, flag, value, reason):
    with pytest.raises(CommandError, match=f"{flag}: .*{reason}"):
        configure(place, *unattended(**{flag[2:].replace("-", "_"): value}))
    assert (place / ".env").read_text() == EXISTING_ENV
    assert not profile_of(place).exists()


def test_no_input_without_an_answer_that_has_no_default_fails_naming_the_flag(place):
    with pytest.raises(CommandError, match="--next-hop is missing"):
        configure(place, *unattended(without=("--next-hop",)))
    with pytest.raises(CommandError, match="--ldap-server is missing"):
        configure(place, *unattended(without=("--exchange",)))


def test_profile_dir_flag_and_an_existing_profile_keep_its_lines_and_mode(place):
    profiles = place / "profiles"
    profiles.mkdir()
    (profiles / "Relay").write_text("reject_score=100\n")
    (profiles / "Medium").write_text("# ours\nreject_score=3\nbody_rejecti=2,viagra\n"
                                     "spam_destiny=bounce\nspam_destiny=pass\n")
    os.chmod(profiles / "Medium", 0o640)

    configure(place, *unattended(), "--profile-dir", str(profiles))

    text = (profiles / "Medium").read_text()
    assert text.startswith("# ours\nreject_score=5\nbody_rejecti=2,viagra\n"
                           "spam_destiny=pass\n")
    assert text.count("spam_destiny=") == 1
    assert stat.S_IMODE((profiles / "Medium").stat().st_mode) == 0o640
    assert read_profile(profiles / "Medium").body_rejecti[0].score == 2
    assert read_env_file(place / ".env")["PROFILE_DIR"] == str(profiles)


def test_env_values_read_back_exactly_as_written(tmp_path):
    hard = "pa ss'wo\"rd \\ $HOME # not a comment"
    path = tmp_path / ".env"
    path.write_text(update_env_text("A=1\n", {"LDAP_BIND_PASSWORD": hard, "B": "x,y"}))
    # As the settings module reads it (interpolation on) and as the wizard does.
    assert dotenv_values(path)["LDAP_BIND_PASSWORD"] == hard
    assert read_env_file(path) == {"A": "1", "LDAP_BIND_PASSWORD": hard, "B": "x,y"}


def test_the_command_reads_its_answers_from_a_pipe(tmp_path):
    env_file = tmp_path / ".env"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "SPAMVIEWER_IGNORE_DOTENV": "1",
        "SPAMVIEWER_VAR_DIR": str(tmp_path / "var"),
        "DJANGO_SETTINGS_MODULE": "spamviewer.settings",
    }
    done = subprocess.run(
        [sys.executable, "manage.py", "configure", "--env-file", str(env_file)],
        cwd=ROOT, env=env, input="".join(f"{a}\n" for a in ANSWERS), text=True,
        capture_output=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "Please answer again." in done.stdout
    assert read_env_file(env_file)["RELAY_NEXT_HOP"] == "mail.example.com:2525"
    assert read_profile(tmp_path / "var" / "profiles" / "Medium").spam_destiny == "discard"


# Exchange integration, against a real slapd ----------------------------------------------


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    server = start_slapd(tmp_path_factory.mktemp("slapd"))
    yield server
    server.stop()


def exchange_answers(server: str, password: str, base_dn: str, insecure: str = "no"):
    return ANSWERS[:10] + ["yes", server, SYNC_DN, password, base_dn, insecure]


@pytest.mark.slapd
def test_exchange_integration_is_tested_and_written(place, slapd):
    with open(place / ".env", "a") as env:
        env.write(f"LDAP_CA_FILE={slapd.ca_file}\n")
    output = configure(place, answers=exchange_answers(slapd.ldaps_url, SYNC_PW, SUFFIX)
                       + ANSWERS[11:])

    assert "The directory answered" in output
    assert "Active Directory password: ********" in output
    assert SYNC_PW not in output
    values = read_env_file(place / ".env")
    assert values["LDAP_SERVER"] == slapd.ldaps_url
    assert values["LDAP_BIND_DN"] == SYNC_DN
    assert values["LDAP_BIND_PASSWORD"] == SYNC_PW
    assert values["LDAP_BASE_DN"] == SUFFIX
    assert values["LDAP_ALLOW_INSECURE"] == "False"
    assert values["LOGIN_METHOD"] == "ldap"
    assert stat.S_IMODE((place / ".env").stat().st_mode) == 0o600

    # Run again: every answer offered, the password kept without being shown.
    again = configure(place, answers=[""] * 19)
    assert f"[{slapd.ldaps_url}]:" in again
    assert "Password of that account [keep the current one]:" in again
    assert read_env_file(place / ".env")["LDAP_BIND_PASSWORD"] == SYNC_PW


@pytest.mark.slapd
def test_a_wrong_password_says_credentials_and_asks_again(place, slapd):
    with open(place / ".env", "a") as env:
        env.write(f"LDAP_CA_FILE={slapd.ca_file}\n")
    answers = (exchange_answers(slapd.ldaps_url, "wrong password", SUFFIX)
               + ["no", "", "", SYNC_PW, "", ""] + ANSWERS[11:])
    output = configure(place, answers=answers)

    assert f"the server refused the credentials of {SYNC_DN}" in output
    assert "Keep these answers anyway? (Yes/No) [No]:" in output
    assert "The directory answered" in output
    assert read_env_file(place / ".env")["LDAP_BIND_PASSWORD"] == SYNC_PW


@pytest.mark.slapd
def test_a_wrong_base_dn_says_base_dn_and_can_be_kept(place, slapd):
    with open(place / ".env", "a") as env:
        env.write(f"LDAP_CA_FILE={slapd.ca_file}\n")
    missing = f"ou=nowhere,{SUFFIX}"
    output = configure(place, answers=exchange_answers(slapd.ldaps_url, SYNC_PW, missing)
                       + ["yes"] + ANSWERS[11:])

    assert f"the base DN {missing} does not exist" in output
    assert read_env_file(place / ".env")["LDAP_BASE_DN"] == missing


@pytest.mark.slapd
def test_an_untrusted_certificate_says_tls(place, slapd):
    args = unattended(
        exchange="yes", ldap_server=slapd.ldaps_url, ldap_bind_dn=SYNC_DN,
        ldap_base_dn=SUFFIX, ldap_allow_insecure="no",
        ldap_bind_password_file=str(_password_file(place, SYNC_PW)),
    )
    with pytest.raises(CommandError, match="the TLS connection to .* failed"):
        configure(place, *args)
    assert (place / ".env").read_text() == EXISTING_ENV


def test_nothing_listening_says_cannot_contact(place, closed_port):
    server = f"ldap://127.0.0.1:{closed_port}"
    args = unattended(
        exchange="yes", ldap_server=server, ldap_bind_dn=SYNC_DN, ldap_base_dn=SUFFIX,
        ldap_bind_password_file=str(_password_file(place, "secret")),
    )
    with pytest.raises(CommandError, match=f"cannot contact the directory server {server}"):
        configure(place, *args)
    assert (place / ".env").read_text() == EXISTING_ENV

    configure(place, *args, "--skip-ldap-test")
    values = read_env_file(place / ".env")
    assert (values["LDAP_SERVER"], values["LDAP_BIND_PASSWORD"]) == (server, "secret")


def _password_file(place: Path, password: str) -> Path:
    path = place / "password"
    path.write_text(password + "\n")
    return path


def test_a_profile_saved_with_a_byte_order_mark_is_read_and_updated(place):
    """Windows editors start a file with a byte order mark; the worker reads such a
    profile, so configure must too, and offers its values as the previous answers."""
    profiles = place / "profiles"
    profiles.mkdir()
    (profiles / "Relay").write_text("reject_score=100\n")
    (profiles / "Medium").write_bytes(b"\xef\xbb\xbfreject_score=3\nspam_destiny=bounce\n")

    configure(place, *unattended(without=("--spam-destiny",)), "--profile-dir", str(profiles))

    text = (profiles / "Medium").read_text(encoding="utf-8")
    assert text.startswith("reject_score=5\nspam_destiny=bounce\n"), text
    assert read_profile(profiles / "Medium").spam_destiny == "bounce"
