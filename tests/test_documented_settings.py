"""Every environment variable the code reads is documented in docs/configuration.md."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The settings module reads through spamviewer.env helpers, the filter through its own
# small environment reader; both name the variable as the first, quoted argument.
READ_RE = re.compile(
    r"\b(?:env_[a-z]+|env\.[a-z_]+|os\.environ\.get|os\.getenv)\(\s*\"([A-Z][A-Z0-9_]+)\""
)
INTERNAL = {"DJANGO_SETTINGS_MODULE", "DJANGO_ALLOW_ASYNC_UNSAFE"}


def _read_variables() -> dict[str, str]:
    found: dict[str, str] = {}
    sources = [ROOT / "spamviewer" / "settings.py", *sorted((ROOT / "mailfilter").rglob("*.py")),
               *sorted((ROOT / "quarantine" / "management").rglob("*.py")),
               *sorted((ROOT / "directory").rglob("*.py"))]
    for path in sources:
        for name in READ_RE.findall(path.read_text()):
            found.setdefault(name, str(path.relative_to(ROOT)))
    return found


def test_the_scan_finds_the_variables_it_should():
    names = _read_variables()
    assert {"DATABASE_URL", "QUARANTINE_DIR", "FILTER_LISTEN", "LDAP_SERVER"} <= set(names)


def test_every_variable_read_by_the_code_is_documented():
    docs = (ROOT / "docs" / "configuration.md").read_text()
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", docs))
    missing = {name: where for name, where in _read_variables().items()
               if name not in documented and name not in INTERNAL}
    assert not missing, f"not in docs/configuration.md: {missing}"
