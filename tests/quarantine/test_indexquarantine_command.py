"""manage.py indexquarantine: progress, errors by name, one summary line per directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from quarantine.models import Message

SAMPLES = Path(__file__).parent / "samples"
MANAGE = Path(__file__).resolve().parents[2] / "manage.py"

pytestmark = pytest.mark.django_db


def run(*args: str) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command("indexquarantine", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_indexes_the_configured_quarantine_dir_by_default(quarantine_dir):
    shutil.copytree(SAMPLES / "amavis-subdirs", quarantine_dir, dirs_exist_ok=True)

    out, err = run()

    assert out == (
        f"indexed {quarantine_dir.resolve()}: 3 new, 0 updated, 0 unchanged, "
        "0 unreadable, 0 skipped, 0 removed\n"
    )
    assert err == ""
    assert Message.objects.count() == 3


def test_second_run_reports_everything_unchanged(tmp_path):
    root = tmp_path / "amavis"
    shutil.copytree(SAMPLES / "amavis", root)
    run(str(root))

    out, _ = run(str(root))

    assert out.strip().endswith("0 new, 0 updated, 4 unchanged, 0 unreadable, 0 skipped, 0 removed")


def test_several_directories_give_one_summary_line_each(tmp_path):
    flat, subdirs = tmp_path / "flat", tmp_path / "subdirs"
    shutil.copytree(SAMPLES / "amavis", flat)
    shutil.copytree(SAMPLES / "amavis-subdirs", subdirs)

    out, _ = run(str(flat), str(subdirs))

    assert out.splitlines() == [
        f"indexed {flat}: 4 new, 0 updated, 0 unchanged, 0 unreadable, 0 skipped, 0 removed",
        f"indexed {subdirs}: 3 new, 0 updated, 0 unchanged, 0 unreadable, 0 skipped, 0 removed",
    ]
    assert Message.objects.count() == 7


def test_unreadable_file_is_named_on_stderr_and_the_run_succeeds(tmp_path):
    root = tmp_path / "amavis"
    shutil.copytree(SAMPLES / "amavis", root)
    (root / "spam-broken0001x.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")

    out, err = run(str(root))

    assert "4 new, 0 updated, 0 unchanged, 1 unreadable" in out
    assert str(root / "spam-broken0001x.gz") in err
    assert "\x1b[" not in out + err  # no progress bar when output is not a terminal


def test_missing_directory_fails_naming_it_after_indexing_the_others(tmp_path):
    root = tmp_path / "amavis"
    shutil.copytree(SAMPLES / "amavis", root)
    missing = tmp_path / "no-such-dir"
    out, err = StringIO(), StringIO()

    with pytest.raises(CommandError, match="no-such-dir"):
        call_command("indexquarantine", str(missing), str(root), stdout=out, stderr=err)

    assert str(missing) in err.getvalue()
    assert f"indexed {root}: 4 new" in out.getvalue()
    assert Message.objects.count() == 4


def test_missing_directory_gives_a_non_zero_exit_code(tmp_path):
    missing = tmp_path / "no-such-dir"
    env = {**os.environ, "QUARANTINE_DIR": str(tmp_path / "store")}

    result = subprocess.run(
        [sys.executable, str(MANAGE), "indexquarantine", "--skip-checks", str(missing)],
        capture_output=True, text=True, env=env, timeout=60,
    )

    assert result.returncode == 1
    assert str(missing) in result.stderr
    assert result.stdout == ""


def test_async_option_hands_the_work_to_the_task(tmp_path, settings):
    # No broker configured: the task runs in-process, as a deployment without Redis does.
    assert settings.CELERY_TASK_ALWAYS_EAGER
    root = tmp_path / "amavis"
    shutil.copytree(SAMPLES / "amavis", root)

    out, _ = run("--async", str(root))

    assert out == f"queued indexing of {root}\n"
    assert Message.objects.count() == 4


def test_async_option_without_a_broker_names_a_directory_it_cannot_read(tmp_path, settings):
    assert settings.CELERY_TASK_ALWAYS_EAGER
    missing = tmp_path / "nowhere"

    with pytest.raises(CommandError, match=f"1 of 1 quarantine directories not indexed: {missing}"):
        run("--async", str(missing))
