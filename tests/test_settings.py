import subprocess
import sys
from pathlib import Path

import pytest

from spamviewer.env import ImproperlyConfiguredEnv, env_bool, env_int

ROOT = Path(__file__).resolve().parent.parent


def test_env_bool_refuses_ambiguous_values(monkeypatch):
    monkeypatch.setenv("X_FLAG", "maybe")
    with pytest.raises(ImproperlyConfiguredEnv, match="X_FLAG"):
        env_bool("X_FLAG", False)


def test_env_int_names_the_variable(monkeypatch):
    monkeypatch.setenv("X_NUM", "ten")
    with pytest.raises(ImproperlyConfiguredEnv, match="X_NUM='ten'"):
        env_int("X_NUM", 1)


def test_production_settings_pass_check_deploy(tmp_path):
    env = {
        "PATH": "/usr/bin:/bin",
        "SPAMVIEWER_VAR_DIR": str(tmp_path),
        "SPAMVIEWER_IGNORE_DOTENV": "1",
        "SECRET_KEY": "k" * 20 + "Zq8_x-3vP0aLr9sT2wQe7uYiOpAsDfGhJkL",
        "HTTPS_ONLY": "True",
        "ALLOWED_HOSTS": "quarantine.example.com",
        "QUARANTINE_DIR": str(tmp_path / "q"),
    }
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_no_secret_key_in_environment_generates_a_private_one(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "SPAMVIEWER_VAR_DIR": str(tmp_path),
           "SPAMVIEWER_IGNORE_DOTENV": "1"}
    code = "from django.conf import settings; print(settings.SECRET_KEY)"
    runs = [
        subprocess.run([sys.executable, "-c", "import django; django.setup();" + code],
                       cwd=ROOT, env={**env, "DJANGO_SETTINGS_MODULE": "spamviewer.settings"},
                       capture_output=True, text=True, check=True).stdout.strip()
        for _ in range(2)
    ]
    assert len(runs[0]) >= 50 and runs[0] == runs[1]
    assert (tmp_path / "secret_key").stat().st_mode & 0o077 == 0


def test_importing_mailfilter_does_not_import_django():
    code = "import sys, mailfilter; assert 'django' not in sys.modules, 'django imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


@pytest.mark.parametrize(("ldap_server", "jobs"), [
    ("", ["prune-quarantine"]),
    ("ldap://dc1.example.test", ["prune-quarantine", "sync-directory"]),
])
def test_beat_runs_the_directory_sync_only_with_a_directory(tmp_path, ldap_server, jobs):
    env = {"PATH": "/usr/bin:/bin", "SPAMVIEWER_VAR_DIR": str(tmp_path),
           "SPAMVIEWER_IGNORE_DOTENV": "1", "LDAP_SERVER": ldap_server,
           "DJANGO_SETTINGS_MODULE": "spamviewer.settings"}
    code = ("import django; django.setup(); from django.conf import settings; "
            "print(' '.join(sorted(settings.CELERY_BEAT_SCHEDULE)))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=True)
    assert done.stdout.split() == jobs
