"""Setup and deployment edges, as a new admin meets them: `make run` on a fresh Debian
machine, the docker files, the settings' refusals, the setup wizard's files, and the
Postfix lines `postfixconfig` prints. Each test runs the real command where it can."""

from __future__ import annotations

import importlib.metadata
import os
import secrets
import signal
import smtplib
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.ports import free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"


def _base_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A clean environment: no .env, a var dir and SQLite database of the test's own."""
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("FILTER_", "LDAP_", "RELAY_", "REDIS_", "EMBEDDED_", "SECRET_KEY"))
    }
    env.update(
        SPAMVIEWER_IGNORE_DOTENV="1",
        SPAMVIEWER_VAR_DIR=str(tmp_path / "var"),
        DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}",
        STATIC_ROOT=str(tmp_path / "static"),
        QUARANTINE_DIR=str(tmp_path / "quarantine"),
    )
    env.update(extra)
    return env


def _manage(env: dict[str, str], *args: str, timeout: float = 120):
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=timeout,
    )


def _env_example() -> dict[str, str]:
    values: dict[str, str] = {}
    for line in (DOCKER / "env.example").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        name, _, value = line.partition("=")
        values[name.strip()] = value.strip()
    return values


# --- make run on a fresh Debian 12 machine ------------------------------------------------


def _package_names(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        name = line.split("#", 1)[0].strip()
        if name:
            names.add(name)
    return names


def test_make_install_installs_what_a_fresh_debian_needs_for_the_venv_and_python_ldap():
    """README: `make run` works on a fresh Debian 12 machine: it installs the Debian
    packages it needs, creates .venv and installs the Python dependencies. On Debian,
    `python3 -m venv` needs python3-venv (ensurepip is split out of python3), and
    python-ldap has no binary wheel for Linux: pip compiles it, which needs a C compiler
    and the Python headers (gcc/build-essential, python3-dev) besides libldap2-dev and
    libsasl2-dev. apt-packages.txt, the list `make install` installs, must name them."""
    dist = importlib.metadata.distribution("python-ldap")
    wheel = dist.read_text("WHEEL") or ""
    tags = [line.split(":", 1)[1].strip() for line in wheel.splitlines()
            if line.startswith("Tag:")]
    if not tags or any("manylinux" in tag or "musllinux" in tag for tag in tags):
        pytest.skip(f"python-ldap came as a binary wheel here ({tags})")
    # It was built on this machine (tag linux_x86_64, not manylinux): a compiler ran.
    names = _package_names(ROOT / "apt-packages.txt")
    missing = []
    if not names & {"python3-venv", "python3.11-venv"}:
        missing.append("python3-venv (for `python3 -m venv`)")
    if not names & {"gcc", "build-essential"}:
        missing.append("gcc or build-essential (to compile python-ldap)")
    if not names & {"python3-dev", "python3.11-dev", "libpython3-dev", "libpython3.11-dev"}:
        missing.append("python3-dev (Python.h for python-ldap)")
    assert not missing, (
        f"apt-packages.txt lists only {sorted(names)}; a fresh Debian 12 also needs: "
        + "; ".join(missing)
    )


# --- docker: no fixed secrets, health checks that pass on a healthy service -----------------


def test_docker_env_example_ships_no_usable_secret_key():
    """No fixed secret key in the docker files: `cp docker/env.example docker/.env` then
    `docker compose up` (docs/deployment.md) must not run with a SECRET_KEY that anybody
    can read in the repository. Either the example leaves SECRET_KEY empty (the image then
    generates one in the store volume) or the settings refuse the placeholder, so that
    `manage.py check --deploy` fails with it."""
    example = _env_example()
    key = example.get("SECRET_KEY", "")
    if not key:
        return
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("FILTER_", "LDAP_", "RELAY_", "REDIS_", "EMBEDDED_"))
    }
    env.update(example)
    env.update(
        SPAMVIEWER_IGNORE_DOTENV="1",
        SPAMVIEWER_VAR_DIR=str(Path(os.environ.get("TMPDIR", "/tmp"))),
        DATABASE_URL="sqlite:///:memory:",
        SECRET_KEY=key,
    )
    env.pop("SECRET_KEY_FILE", None)
    result = _manage(env, "check", "--deploy", "--fail-level", "WARNING")
    assert result.returncode != 0, (
        f"docker/env.example's SECRET_KEY={key!r} is accepted as it is "
        f"(check --deploy passes: {result.stdout.strip()!r}); every copy of the example "
        "signs sessions with the same public key"
    )


def test_docker_env_example_ships_no_database_password():
    """No fixed default passwords in the docker files. compose.yml guards the database
    password with ${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD in docker/.env}, but the
    example fills it in, so a verbatim copy starts PostgreSQL with a password printed in
    the repository and the guard never fires. The example must leave it empty."""
    example = _env_example()
    assert example.get("POSTGRES_PASSWORD", "") == "", (
        f"docker/env.example sets POSTGRES_PASSWORD={example['POSTGRES_PASSWORD']!r}"
    )


def test_the_compose_web_health_check_passes_on_a_healthy_viewer(tmp_path):
    """compose.yml's `web` health check fetches http://127.0.0.1:8000/healthz inside the
    container; worker, beat and filter wait for `web` to be healthy, and Postfix for the
    filter. With the production settings of docker/env.example (ALLOWED_HOSTS=the public
    name, HTTPS_ONLY, BEHIND_PROXY) a viewer that serves must pass it: /healthz has to
    answer 200 to the probe's Host 127.0.0.1:8000 (docs/deployment.md: "/healthz answers
    over plain HTTP ... for probes from the host")."""
    compose = yaml.safe_load((DOCKER / "compose.yml").read_text())
    probe = list(compose["services"]["web"]["healthcheck"]["test"])
    assert probe[0] == "CMD" and probe[1] == "python"
    example = _env_example()
    port = free_port()
    env = _base_env(
        tmp_path,
        ALLOWED_HOSTS=example["ALLOWED_HOSTS"],
        CSRF_TRUSTED_ORIGINS=example["CSRF_TRUSTED_ORIGINS"],
        HTTPS_ONLY=example["HTTPS_ONLY"],
        BEHIND_PROXY=example["BEHIND_PROXY"],
        SECRET_KEY=secrets.token_urlsafe(50),
    )
    log = open(tmp_path / "gunicorn.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "spamviewer.wsgi:application", "--bind",
         f"127.0.0.1:{port}", "--workers", "1", "--no-control-socket"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_for(lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close())
        argv = [sys.executable if part == "python" else
                part.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for part in probe[1:]]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()
    assert result.returncode == 0, (
        "the web health check fails on a serving viewer, so worker, beat, filter and "
        f"Postfix never start: {result.stderr.strip().splitlines()[-1:]}\n"
        + (tmp_path / "gunicorn.log").read_text()[-600:]
    )


# --- settings refuse bad values naming the variable -------------------------------------------


@pytest.mark.parametrize("name, value", [
    ("QUARANTINE_PRUNE_CRON", "61 * * * *"),
    ("DIRECTORY_SYNC_CRON", "30 25 * * *"),
    ("LOG_LEVEL", "verbose"),
])
def test_a_bad_setting_stops_the_start_with_an_error_naming_it(tmp_path, name, value):
    """spamviewer/env.py: a value the settings cannot use stops the start "with a clear
    message" that names the variable. A cron expression with five fields but an
    impossible value, or a log level that does not exist, must say which variable."""
    result = _manage(_base_env(tmp_path, **{name: value}), "check")
    assert result.returncode != 0
    # The error itself (the traceback's last line), not the traceback's quoted source.
    last = (result.stderr.strip().splitlines() or [""])[-1]
    assert name in last, f"{name}={value!r} stops the start with: {last}"


# --- secrets written with mode 0600 from the first byte ---------------------------------------


def test_the_generated_secret_key_is_never_readable_by_others(tmp_path):
    """The secret key generated into var/ (settings._secret_key) is a secret: the file that
    becomes it is readable by its owner only before it takes its name, with the usual
    umask 022 too, and stays so."""
    # Every file opened under var/ is looked at the moment it exists (os.open, which
    # mkstemp uses, and io.open, which Path.write_text uses), and again at its rename.
    code = """
import builtins, io, os, stat
os.umask(0o022)
modes = []
def note(path):
    name = os.fspath(path) if not isinstance(path, int) else ""
    if "secret" in os.path.basename(str(name)):
        modes.append(oct(stat.S_IMODE(os.stat(name).st_mode)))
def watch(original):
    def opened(path, *args, **kwargs):
        result = original(path, *args, **kwargs)
        note(path)
        return result
    return opened
os.open = watch(os.open)
io.open = builtins.open = watch(io.open)
original_replace = os.replace
def replace(src, dst, *args, **kwargs):
    note(src)
    return original_replace(src, dst, *args, **kwargs)
os.replace = replace
import spamviewer.settings
print(modes)
"""
    env = _base_env(tmp_path)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    key = tmp_path / "var" / "secret_key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    modes = eval(result.stdout.strip().splitlines()[-1])  # noqa: S307 (our own output)
    assert modes and all(int(mode, 8) & 0o077 == 0 for mode in modes), modes
    assert sorted(p.name for p in key.parent.iterdir() if "secret" in p.name) == ["secret_key"]


# --- the setup wizard -------------------------------------------------------------------------


def test_configure_password_is_the_one_the_settings_use_when_a_password_file_was_set(tmp_path):
    """Secrets may come from NAME_FILE (docs/configuration.md), and the settings prefer
    LDAP_BIND_PASSWORD_FILE over LDAP_BIND_PASSWORD. When .env names a password file and
    the admin runs `configure` with a new sync password, the password configure writes
    must be the one the settings then read: configure has to drop (or rewrite) the
    _FILE line, not leave the old file in charge."""
    old = tmp_path / "old-password"
    old.write_text("the-old-password\n")
    new = tmp_path / "new-password"
    new.write_text("the-new-password\n")
    env_file = tmp_path / ".env"
    env_file.write_text(f"LDAP_BIND_PASSWORD_FILE={old}\n")
    env = _base_env(tmp_path)
    result = _manage(
        env, "configure", "--no-input", "--skip-ldap-test", "--env-file", str(env_file),
        "--profile-dir", str(tmp_path / "profiles"), "--exchange", "yes",
        "--ldap-server", "ldap.example.com", "--ldap-bind-dn", "sync@example.com",
        "--ldap-bind-password-file", str(new), "--ldap-base-dn", "DC=example,DC=com",
        "--ldap-allow-insecure", "no", "--relay-domains", "example.com",
        "--next-hop", "mail.example.com",
    )
    assert result.returncode == 0, result.stderr
    code = (
        "import sys; from dotenv import load_dotenv; load_dotenv(sys.argv[1]); "
        "from spamviewer.env import env_secret; print(env_secret('LDAP_BIND_PASSWORD'))"
    )
    read = subprocess.run([sys.executable, "-c", code, str(env_file)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=True)
    assert read.stdout.strip() == "the-new-password", (
        f"configure wrote the new password, but the settings read {read.stdout.strip()!r}:\n"
        + env_file.read_text()
    )


# --- runsystem and the wizard's "serve the web viewer?" ---------------------------------------


def test_web_viewer_false_keeps_runsystem_from_serving_the_viewer(tmp_path):
    """configure asks "Enable the web viewer for quarantined messages?" and writes
    WEB_VIEWER; docs/configuration.md: "`False` says this host runs only the filter". So
    `runsystem` (what `make run` starts) with WEB_VIEWER=False starts the filter but no
    web viewer: nothing answers on WEB_LISTEN."""
    web = f"127.0.0.1:{free_port()}"
    filter_port = free_port()
    env = _base_env(
        tmp_path, WEB_LISTEN=web, FILTER_LISTEN=f"127.0.0.1:{filter_port}",
        FILTER_NEXT_HOP=f"127.0.0.1:{free_port()}", WEB_VIEWER="False",
        VADMIN_PASSWORD="a long enough test password",
    )
    for step in (["migrate", "--noinput", "-v0"], ["collectstatic", "--noinput", "-v0"]):
        done = _manage(env, *step)
        assert done.returncode == 0, done.stderr
    log = open(tmp_path / "runsystem.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "runsystem"], cwd=ROOT, env=env, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True,
    )
    served = False
    try:
        def filter_up():
            with smtplib.SMTP("127.0.0.1", filter_port, timeout=5) as smtp:
                return smtp.noop()

        wait_for(filter_up, 60)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not served:
            try:
                with urllib.request.urlopen(f"http://{web}/login/", timeout=3) as reply:
                    served = reply.status == 200
            except OSError:
                time.sleep(0.3)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    assert not served, (
        f"WEB_VIEWER=False, yet runsystem serves the viewer on {web}:\n"
        + (tmp_path / "runsystem.log").read_text()[:400]
    )


# --- Postfix: the proxy_filter snippet --------------------------------------------------------


def _apply_snippet(text: str, directory: Path) -> None:
    """The printed main.cf and master.cf lines appended to a scratch Postfix config."""
    main, master, part = [], [], None
    for line in text.splitlines():
        if line == "# main.cf":
            part = main
        elif line == "# master.cf":
            part = master
        elif line.startswith("#") or not line.strip() or part is None:
            continue
        else:
            part.append(line)
    (directory / "main.cf").write_text(
        "compatibility_level = 3.6\n" + "\n".join(main) + "\n")
    (directory / "master.cf").write_text(
        "pickup unix n - y 60 1 pickup\ncleanup unix n - y - 0 cleanup\n"
        "qmgr unix n - n 300 1 qmgr\n" + "\n".join(master) + "\n")


def test_proxy_filter_reinjection_keeps_postfixs_header_and_body_checks(tmp_path):
    """In proxy_filter mode the before-filter smtpd hands the mail to the worker and the
    reinjection smtpd on 10025 is the first (and only) one that passes it to cleanup:
    header_checks, body_checks and cleanup's bare CR/LF repair run there or nowhere. The
    SMTPD_PROXY_README layout (/work/shared/spec/postfix-filter.md 4.2) therefore gives the
    after-filter smtpd `receive_override_options=no_unknown_recipient_checks` only;
    no_header_body_checks (and no_milters) belong to the content_filter layout, where
    cleanup already ran before the queue."""
    if not Path("/usr/sbin/postconf").exists():
        pytest.skip("no postconf")
    env = _base_env(tmp_path)
    result = _manage(env, "postfixconfig", "--mode", "proxy_filter")
    assert result.returncode == 0, result.stderr
    _apply_snippet(result.stdout, tmp_path)
    shown = subprocess.run(["/usr/sbin/postconf", "-c", str(tmp_path), "-P"],
                           capture_output=True, text=True, check=True).stdout
    overrides = dict(
        line.split(" = ", 1) if " = " in line else (line.rstrip(" ="), "")
        for line in shown.splitlines()
    )
    assert "smtp/inet/smtpd_proxy_filter" in overrides, shown
    value = overrides.get("127.0.0.1:10025/inet/receive_override_options", "")
    assert "no_header_body_checks" not in value, (
        f"proxy_filter mode: the reinjection smtpd gets receive_override_options={value}, "
        "so Postfix's header_checks and body_checks never run on any inbound mail"
    )


def test_configure_keeps_a_password_file_whose_password_is_unchanged(tmp_path):
    """Re-running the setup with the password its LDAP_BIND_PASSWORD_FILE already holds
    (a mounted secret) leaves the file in charge: the secret is not copied into .env. A
    new password replaces the file line, as the settings must then read the new one."""
    from spamviewer.setup_wizard import update_env_text

    secret = tmp_path / "ldap-password"
    secret.write_text("the mounted secret\n")
    text = f"LDAP_SERVER=ldaps://dc.example.test\nLDAP_BIND_PASSWORD_FILE={secret}\n"

    kept = update_env_text(text, {"LDAP_BIND_PASSWORD": "the mounted secret"})
    changed = update_env_text(text, {"LDAP_BIND_PASSWORD": "a new one"})

    assert f"LDAP_BIND_PASSWORD_FILE={secret}" in kept and "LDAP_BIND_PASSWORD=" not in kept
    assert "LDAP_BIND_PASSWORD_FILE" not in changed and "a new one" in changed
