"""What README.md and docs/ tell an administrator holds: every variable named is one the code
reads (and the other way round), the documented defaults are the real ones, the secret marks
match the settings read from files, the commands in the shell blocks run as written, and
the documented way to add the search indexes later keeps the rest of the database."""

from __future__ import annotations

import io
import re
import shlex
from pathlib import Path

import pytest
from django.core.management import call_command, get_commands, load_command_class
from django.db import connection

from mailfilter.config import FilterConfig
from tests.test_documented_settings import INTERNAL, READ_RE

ROOT = Path(__file__).resolve().parent.parent
CONFIGURATION = ROOT / "docs" / "configuration.md"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SECRET_RE = re.compile(r"\benv_secret\(\s*\"([A-Z][A-Z0-9_]+)\"")


def _code_files() -> list[Path]:
    """Every module of the product (the settings, the commands of all three apps, the
    filter), not the tests or the benchmarks."""
    files = []
    for package in ("spamviewer", "mailfilter", "quarantine", "directory"):
        files += [p for p in sorted((ROOT / package).rglob("*.py")) if "migrations" not in p.parts]
    return files


def _variables_read() -> dict[str, str]:
    found: dict[str, str] = {}
    for path in _code_files():
        for name in READ_RE.findall(path.read_text()):
            found.setdefault(name, str(path.relative_to(ROOT)))
    return found


def _table_rows(text: str) -> list[tuple[list[str], str]]:
    """(variable names of the first column, default cell) of every table row."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        names = re.findall(r"`([A-Z][A-Z0-9_]+)`", cells[0])
        if names and len(cells) >= 3:
            rows.append((names, cells[1]))
    return rows


def test_every_variable_read_anywhere_is_documented():
    """The runsystem, postfixconfig and ensurevadmin commands read variables of their own
    (WEB_LISTEN, WEB_VIEWER, RELAY_DOMAINS, RELAY_NEXT_HOP, VADMIN_PASSWORD)."""
    read = _variables_read()
    assert {
        "WEB_LISTEN",
        "WEB_VIEWER",
        "RELAY_DOMAINS",
        "RELAY_NEXT_HOP",
        "VADMIN_PASSWORD",
    } <= set(read)
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", CONFIGURATION.read_text()))
    missing = {n: w for n, w in read.items() if n not in documented and n not in INTERNAL}
    assert not missing, f"read by the code, not in docs/configuration.md: {missing}"


def test_every_variable_in_the_reference_tables_is_read_by_the_code():
    read = set(_variables_read()) | set(FilterConfig.from_env.__code__.co_consts)
    rows = _table_rows(CONFIGURATION.read_text())
    named = {name for names, _ in rows for name in names}
    assert len(named) > 100
    unknown = sorted(name for name in named if name not in read)
    assert not unknown, f"documented, but no code reads them: {unknown}"


def test_the_secret_marks_are_the_settings_read_from_files():
    marked = {
        name
        for line in CONFIGURATION.read_text().splitlines()
        if line.startswith("| `") and "*(secret)*" in line.split("|")[1]
        for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", line.split("|")[1])
    }
    secrets = set()
    for path in _code_files():
        secrets |= set(SECRET_RE.findall(path.read_text()))
    assert secrets == {"SECRET_KEY", "VADMIN_PASSWORD", "LDAP_BIND_PASSWORD"}
    assert marked == secrets


def test_the_documented_filter_defaults_are_the_real_ones():
    """Setting a variable of the filter's tables to its documented default changes
    nothing."""
    baseline = FilterConfig.from_env({})
    checked = []
    for names, default in _table_rows(CONFIGURATION.read_text()):
        literal = re.fullmatch(r"`([^`]+)`", default)
        if len(names) != 1 or literal is None:
            continue
        name = names[0]
        if name not in FilterConfig.from_env.__code__.co_consts:
            continue
        assert FilterConfig.from_env({name: literal.group(1)}) == baseline, name
        checked.append(name)
    assert {
        "FILTER_LISTEN",
        "FILTER_MAX_MESSAGE_SIZE",
        "CLAMD_TIMEOUT",
        "SPAMD_TIMEOUT",
        "VIRUS_SCAN_FAIL",
        "FILTER_DNS_TIMEOUT",
    } <= set(checked)


def _shell_lines(path: Path) -> list[str]:
    """The commands of the ```sh blocks, continuation lines joined."""
    lines, block = [], None
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            block = [] if line.strip() == "```sh" and block is None else None
            continue
        if block is None:
            continue
        if lines and (lines[-1].endswith("\\") or not _complete(lines[-1])):
            lines[-1] = lines[-1].removesuffix("\\") + " " + line.strip()
        else:
            lines.append(line.strip())
    return [line for line in lines if line and not line.startswith("#")]


def _complete(line: str) -> bool:
    """False while a quoted string opened on this line goes on over the next one."""
    try:
        shlex.split(line, comments=True)
    except ValueError:
        return False
    return True


def _manage_invocations() -> list[tuple[Path, str, list[str]]]:
    found = []
    for path in DOCS:
        for line in _shell_lines(path):
            words = shlex.split(line, comments=True)
            for i, word in enumerate(words):
                if word in ("manage.py", "spamviewer-manage") and i + 1 < len(words):
                    found.append((path, line, words[i + 1 :]))
    return found


def test_no_shell_block_runs_manage_py_as_a_program():
    """`manage.py` is not on the PATH: a block line starting with it fails as typed."""
    bare = [
        (p.name, line) for p in DOCS for line in _shell_lines(p) if line.startswith("manage.py")
    ]
    assert not bare, bare


def test_the_commands_and_options_of_the_shell_blocks_exist():
    invocations = _manage_invocations()
    assert len(invocations) > 10
    commands = get_commands()
    for path, line, words in invocations:
        name = words[0]
        if name.startswith("$"):
            continue  # the spamviewer-manage script itself passes its arguments on
        assert name in commands, f"{path.name}: {line}: no command {name}"
        parser = load_command_class(commands[name], name).create_parser("manage.py", name)
        known = {option for action in parser._actions for option in action.option_strings}
        for word in words[1:]:
            if word.startswith("--"):
                assert word.split("=")[0] in known, f"{path.name}: {line}: {word}"


@pytest.mark.django_db(transaction=True)
def test_the_documented_way_to_add_the_search_indexes_later_keeps_pending_deletions():
    """The indexes come back and the deletions still to be done stay recorded."""
    from quarantine.models import PendingFileDeletion

    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL only")
    PendingFileDeletion.objects.create(
        origin="/var/lib/spamviewer/quarantine", storage_key="s/spam-s0m3key.gz"
    )
    with connection.cursor() as cursor:
        cursor.execute("DROP INDEX message_subject_trgm")
        cursor.execute("DROP INDEX rcpt_address_trgm")
    assert "`spamviewer-manage searchindexes`" in (ROOT / "docs" / "deployment.md").read_text()
    call_command("searchindexes", stdout=io.StringIO())
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexname FROM pg_indexes WHERE indexname LIKE '%%_trgm'")
        indexes = {row[0] for row in cursor.fetchall()}
    assert indexes == {
        "message_subject_trgm",
        "message_from_trgm",
        "message_to_trgm",
        "rcpt_address_trgm",
    }
    assert PendingFileDeletion.objects.filter(storage_key="s/spam-s0m3key.gz").exists()
