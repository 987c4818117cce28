"""spamviewer settings: everything comes from the environment (and `.env`).

Every variable is documented in docs/configuration.md with its default. The defaults are
the embedded ones: SQLite and the store under var/, no Redis.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from pathlib import Path

import dj_database_url
from dotenv import load_dotenv

from spamviewer.env import (
    env_bool,
    env_choice,
    env_float,
    env_int,
    env_list,
    env_secret,
    env_str,
)

BASE_DIR = Path(__file__).resolve().parent.parent
if not env_bool("SPAMVIEWER_IGNORE_DOTENV", False):
    load_dotenv(BASE_DIR / ".env", override=False)

VAR_DIR = Path(env_str("SPAMVIEWER_VAR_DIR", str(BASE_DIR / "var")))

# ---------------------------------------------------------------------------------------
# Core
# ---------------------------------------------------------------------------------------
DEBUG = env_bool("DEBUG", False)
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"])


def _secret_key() -> str:
    """SECRET_KEY from the environment; else one generated once and kept in var/.

    No fixed key ships with the project: a key anybody can read in the source would let
    anybody forge sessions.
    """
    key = env_secret("SECRET_KEY")
    if key:
        return key
    path = VAR_DIR / "secret_key"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        VAR_DIR.mkdir(parents=True, exist_ok=True)
        key = secrets.token_urlsafe(50)
        # Readable by the owner only from its first byte (mkstemp makes it 0600), under
        # a name of its own: two processes starting at once each write a whole key, and
        # the last rename wins for both the next time they read it.
        fd, tmp = tempfile.mkstemp(dir=VAR_DIR, prefix=".secret_key.")
        try:
            with os.fdopen(fd, "w") as out:
                out.write(key)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return path.read_text().strip()


SECRET_KEY = _secret_key()

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "spamviewer",
    "quarantine",
    "directory",
]

MIDDLEWARE = [
    # First: the health probe answers whatever Host header and scheme it comes with.
    "spamviewer.middleware.HealthCheckMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "spamviewer.middleware.SecurityHeadersMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "spamviewer.urls"
WSGI_APPLICATION = "spamviewer.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "spamviewer.context_processors.site",
            ],
        },
    },
]

# ---------------------------------------------------------------------------------------
# Database: DATABASE_URL (postgres://...), SQLite under var/ by default
# ---------------------------------------------------------------------------------------
DATABASES = {
    "default": dj_database_url.parse(
        env_str("DATABASE_URL") or f"sqlite:///{VAR_DIR / 'spamviewer.sqlite3'}",
        conn_max_age=env_int("DATABASE_CONN_MAX_AGE", 60, minimum=0),
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # The filter, the viewer and the indexer write concurrently: WAL and a busy timeout
    # turn "database is locked" into a short wait.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {"timeout": 20, "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"}
    )
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# ---------------------------------------------------------------------------------------
# Authentication
# ---------------------------------------------------------------------------------------
LOGIN_METHOD = env_choice("LOGIN_METHOD", "local", ("local", "ldap"))
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "quarantine:list"
LOGOUT_REDIRECT_URL = "login"
# Log-in throttling (directory/throttle.py): attempts that have not succeeded within the
# last LOGIN_LOCKOUT_MINUTES, per typed account name and per client address. Keep the
# account limit below the directory's own lockout threshold so that guessing here never
# locks the person out of Windows.
LOGIN_FAILURE_LIMIT = env_int("LOGIN_FAILURE_LIMIT", 10, minimum=1)
LOGIN_IP_FAILURE_LIMIT = env_int("LOGIN_IP_FAILURE_LIMIT", 50, minimum=1)
LOGIN_LOCKOUT_MINUTES = env_int("LOGIN_LOCKOUT_MINUTES", 15, minimum=1)
AUTHENTICATION_BACKENDS = ["django.contrib.auth.backends.ModelBackend"]
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {
        "NAME": "django.contrib.auth.password_validation.MinimumLengthValidator",
        "OPTIONS": {"min_length": 10},
    },
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
VADMIN_USERNAME = "vadmin"

# ---------------------------------------------------------------------------------------
# Security. HTTPS_ONLY=True is the production switch: secure cookies, HSTS, redirect.
# ---------------------------------------------------------------------------------------
HTTPS_ONLY = env_bool("HTTPS_ONLY", False)
SESSION_COOKIE_SECURE = HTTPS_ONLY
CSRF_COOKIE_SECURE = HTTPS_ONLY
SECURE_SSL_REDIRECT = HTTPS_ONLY
# Health probes come over plain HTTP from inside the host or container.
SECURE_REDIRECT_EXEMPT = [r"^healthz$"]
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31536000 if HTTPS_ONLY else 0, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = HTTPS_ONLY
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", HTTPS_ONLY)
if HTTPS_ONLY and not SECURE_HSTS_PRELOAD:
    # Turning preload off is a deliberate choice; the check need not nag about it.
    SILENCED_SYSTEM_CHECKS = ["security.W021"]
BEHIND_PROXY = env_bool("BEHIND_PROXY", False)
if BEHIND_PROXY:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
CSRF_COOKIE_SAMESITE = "Lax"
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])
SESSION_COOKIE_AGE = env_int("SESSION_COOKIE_AGE", 8 * 3600, minimum=60)
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
# same-origin, not no-referrer: nothing (quarantine ids in URLs included) reaches another
# site, while the browser still sends a real Origin on our own form posts. With
# no-referrer it sends "Origin: null" and Django's CSRF check refuses every form.
SECURE_REFERRER_POLICY = "same-origin"
SECURE_CROSS_ORIGIN_OPENER_POLICY = "same-origin"
# The pages carry no script at all and load nothing from elsewhere; mail content is shown
# as text only. The policy says so, so that a rendering mistake still cannot run code.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)

# ---------------------------------------------------------------------------------------
# Static files (served by whitenoise)
# ---------------------------------------------------------------------------------------
STATIC_URL = "static/"
STATIC_ROOT = Path(env_str("STATIC_ROOT", str(BASE_DIR / "staticfiles")))
STATICFILES_DIRS = [BASE_DIR / "static"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}
WHITENOISE_USE_FINDERS = DEBUG

# ---------------------------------------------------------------------------------------
# Quarantine
# ---------------------------------------------------------------------------------------
QUARANTINE_DIR = Path(env_str("QUARANTINE_DIR", str(VAR_DIR / "quarantine")))
QUARANTINE_SUBDIR_LEVELS = env_int("QUARANTINE_SUBDIR_LEVELS", 1, minimum=0)
ALLOWED_DOWNLOAD_TYPES = [
    t.upper() for t in env_list("ALLOWED_DOWNLOAD_TYPES", ["SPAM", "BANNED", "BADH"])
]
RELEASE_SMTP_HOST = env_str("RELEASE_SMTP_HOST", "127.0.0.1")
RELEASE_SMTP_PORT = env_int("RELEASE_SMTP_PORT", 10025, minimum=1)
RELEASE_SMTP_TIMEOUT = env_int("RELEASE_SMTP_TIMEOUT", 30, minimum=1)
RELEASE_VIRUS_BY_USERS = env_bool("RELEASE_VIRUS_BY_USERS", False)
QUARANTINE_MAX_SIZE_MB = env_int("QUARANTINE_MAX_SIZE_MB", 500, minimum=0)
QUARANTINE_MAX_AGE_DAYS = env_int("QUARANTINE_MAX_AGE_DAYS", 30, minimum=0)
QUARANTINE_PAGE_SIZE = env_int("QUARANTINE_PAGE_SIZE", 50, minimum=5)
QUARANTINE_PRUNE_CRON = env_str("QUARANTINE_PRUNE_CRON", "15 * * * *")

# ---------------------------------------------------------------------------------------
# Directory (Active Directory / LDAP): the sync, the relay map and LDAP login
# ---------------------------------------------------------------------------------------
LDAP_SERVER = env_str("LDAP_SERVER")
LDAP_BIND_DN = env_str("LDAP_BIND_DN")
LDAP_BIND_PASSWORD = env_secret("LDAP_BIND_PASSWORD")
# Several base DNs are separated by ';' (a DN itself contains commas).
LDAP_BASE_DN = [dn.strip() for dn in env_str("LDAP_BASE_DN").split(";") if dn.strip()]
LDAP_USER_FILTER = env_str("LDAP_USER_FILTER", "(&(objectCategory=person)(objectClass=user))")
LDAP_GROUP_FILTER = env_str("LDAP_GROUP_FILTER", "(objectClass=group)")
LDAP_CONTACT_FILTER = env_str("LDAP_CONTACT_FILTER", "(objectClass=contact)")
LDAP_PUBLIC_FOLDER_FILTER = env_str("LDAP_PUBLIC_FOLDER_FILTER", "(objectClass=publicFolder)")
LDAP_EXTRA_FILTER = env_str("LDAP_EXTRA_FILTER")
LDAP_CA_FILE = env_str("LDAP_CA_FILE")
LDAP_ALLOW_INSECURE = env_bool("LDAP_ALLOW_INSECURE", True)
LDAP_PAGE_SIZE = env_int("LDAP_PAGE_SIZE", 1000, minimum=1)
LDAP_TIMEOUT = env_int("LDAP_TIMEOUT", 10, minimum=1)
# `DOMAIN\user` logs in as sAMAccountName `user` only when DOMAIN is this NetBIOS name.
LDAP_NETBIOS_DOMAIN = env_str("LDAP_NETBIOS_DOMAIN")
DIRECTORY_SYNC_CRON = env_str("DIRECTORY_SYNC_CRON", "30 2 * * *")
DIRECTORY_SYNC_LOCK = Path(env_str("DIRECTORY_SYNC_LOCK", str(VAR_DIR / "directory-sync.lock")))
RELAY_MAP_PATH = Path(env_str("RELAY_MAP_PATH", str(VAR_DIR / "relay_recipients")))
RELAY_MAP_EXTRA = env_str("RELAY_MAP_EXTRA")
RELAY_MAP_DIRECTORY_EXTRA = Path(
    env_str("RELAY_MAP_DIRECTORY_EXTRA", str(VAR_DIR / "relay_extra_directory"))
)
RELAY_MAP_POSTMAP = env_choice(
    "RELAY_MAP_POSTMAP", "hash", ("hash", "btree", "lmdb", "cdb", "texthash", "none")
)
RELAY_MAP_POSTMAP_COMMAND = env_str("RELAY_MAP_POSTMAP_COMMAND", "postmap")
RELAY_MAP_MIN_RATIO = env_float("RELAY_MAP_MIN_RATIO", 0.5)
RELAY_MAP_LOCK_TIMEOUT = env_int("RELAY_MAP_LOCK_TIMEOUT", 60, minimum=0)
if LOGIN_METHOD == "ldap":
    # vadmin (and accounts made locally) log in with the password kept here; everybody
    # else with their directory password. The directory backend finds the person with
    # the sync account, then binds as them (see directory/auth.py).
    AUTHENTICATION_BACKENDS = [
        "directory.auth.LocalAccountBackend",
        "directory.auth.DirectoryBackend",
    ]

# ---------------------------------------------------------------------------------------
# Celery: Redis in production (REDIS_URL). Without it, `runsystem` sets EMBEDDED_BROKER=True
# for the processes it starts: they share kombu's filesystem transport under
# var/celery/, so a worker and beat run with no server at all. With neither (tests, a
# management command run on its own) tasks run in-process.
# ---------------------------------------------------------------------------------------
REDIS_URL = env_str("REDIS_URL")
EMBEDDED_BROKER = env_bool("EMBEDDED_BROKER", False) and not REDIS_URL
CELERY_DIR = VAR_DIR / "celery"
if REDIS_URL:
    CELERY_BROKER_URL = REDIS_URL
    # A job acknowledged late is given to another worker when not acknowledged within
    # this: longer than the hard time limit below, so a long run is never run twice.
    CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 2 * 60 * 60}
elif EMBEDDED_BROKER:
    CELERY_BROKER_URL = "filesystem://localhost/"
    # Producers and the worker use the same folder for both directions. A message is
    # claimed by renaming it into the processed folder (same filesystem, so one consumer
    # wins); runsystem removes processed messages after a day.
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(CELERY_DIR / "queue"),
        "data_folder_out": str(CELERY_DIR / "queue"),
        "control_folder": str(CELERY_DIR / "control"),
        "processed_folder": str(CELERY_DIR / "processed"),
        "store_processed": True,
    }
else:
    CELERY_BROKER_URL = "memory://"
CELERY_RESULT_BACKEND = None
CELERY_TASK_ALWAYS_EAGER = not (REDIS_URL or EMBEDDED_BROKER)
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TIMEZONE = "UTC"
# The jobs (index, prune, directory sync) are safe to run again: a worker that dies in
# the middle leaves its job to be delivered again rather than lost, and a job stuck on a
# hung disk or directory is stopped (soft: the job's own clean-up runs) within the hour.
CELERY_TASK_ACKS_LATE = True
# A job that fails (it raises: its state is FAILURE) is acknowledged, not run again at
# once; the next scheduled run tries again.
CELERY_TASK_ACKS_ON_FAILURE_OR_TIMEOUT = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SOFT_TIME_LIMIT = 55 * 60
CELERY_TASK_TIME_LIMIT = 60 * 60


def _crontab(expr: str, name: str):
    from celery.schedules import crontab

    parts = expr.split()
    if len(parts) != 5:
        from spamviewer.env import ImproperlyConfiguredEnv

        raise ImproperlyConfiguredEnv(f"{name}={expr!r}: expected five cron fields")
    minute, hour, day_of_month, month_of_year, day_of_week = parts
    try:
        return crontab(
            minute=minute,
            hour=hour,
            day_of_month=day_of_month,
            month_of_year=month_of_year,
            day_of_week=day_of_week,
        )
    except Exception as exc:  # ValueError, or celery's ParseException for "1,,2"
        from spamviewer.env import ImproperlyConfiguredEnv

        raise ImproperlyConfiguredEnv(f"{name}={expr!r}: {exc}") from None


CELERY_BEAT_SCHEDULE = {
    "prune-quarantine": {
        "task": "quarantine.tasks.prune_quarantine_task",
        "schedule": _crontab(QUARANTINE_PRUNE_CRON, "QUARANTINE_PRUNE_CRON"),
    },
}
_SYNC_SCHEDULE = _crontab(DIRECTORY_SYNC_CRON, "DIRECTORY_SYNC_CRON")
if LDAP_SERVER:
    # With no directory there is nothing to sync: the run would only fail every night.
    CELERY_BEAT_SCHEDULE["sync-directory"] = {
        "task": "directory.tasks.sync_directory_task",
        "schedule": _SYNC_SCHEDULE,
    }

# ---------------------------------------------------------------------------------------
# Internationalisation and logging
# ---------------------------------------------------------------------------------------
LANGUAGE_CODE = "en-us"
TIME_ZONE = env_str("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_choice(
        "LOG_LEVEL", "INFO",
        ("DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL", "FATAL", "NOTSET"))},
}
