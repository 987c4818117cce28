"""Set up this host: the appliance's setup questions, written to `.env` and the default
profile (see spamviewer/setup_wizard.py). `--no-input` with a flag per answer installs
without a terminal."""

from __future__ import annotations

import getpass
import sys
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from spamviewer import setup_wizard
from spamviewer.setup_wizard import QUESTIONS, WizardError


class _Terminal:
    """Questions on stdout, answers from stdin; the password through getpass when stdin
    is a terminal (no echo), else read as one line like the other answers."""

    def __init__(self, command: BaseCommand, stdin) -> None:
        self.command = command
        self.stdin = stdin

    def say(self, text: str) -> None:
        self.command.stdout.write(text)

    def ask(self, prompt: str) -> str | None:
        self.command.stdout.write(prompt, ending="")
        self.command.stdout.flush()
        line = self.stdin.readline()
        if not line:
            return None
        return line.rstrip("\r\n")

    def ask_secret(self, prompt: str) -> str | None:
        if self.stdin.isatty():
            try:
                return getpass.getpass(prompt)
            except EOFError:
                return None
        return self.ask(prompt)


class Command(BaseCommand):
    help = "Ask the setup questions and write the answers to .env and the default profile."
    # call_command(..., stdin=stream) answers the questions from that stream.
    stealth_options = ("stdin",)

    def add_arguments(self, parser) -> None:
        for question in QUESTIONS:
            if question.secret:
                continue
            parser.add_argument(question.flag, dest=question.key, metavar="ANSWER",
                                help=question.label)
        parser.add_argument(
            "--ldap-bind-password-file", dest="ldap_bind_password", metavar="PATH",
            help="file holding the sync account's password (a password given on the "
                 "command line would be visible to every user in the process list)",
        )
        parser.add_argument("--no-input", action="store_true",
                            help="ask nothing: every answer from a flag, the previous "
                                 "answer or the default")
        parser.add_argument("--env-file", metavar="PATH",
                            help="the .env file to read and write (default: .env in the "
                                 "checkout)")
        parser.add_argument("--profile-dir", metavar="PATH",
                            help="the profile directory (default: PROFILE_DIR, else "
                                 "var/profiles made from the examples)")
        parser.add_argument("--skip-ldap-test", action="store_true",
                            help="do not test the Exchange (LDAP) connection")

    def handle(self, *args, **options) -> None:
        env_file = Path(options["env_file"] or settings.BASE_DIR / ".env")
        try:
            locations = setup_wizard.locate(
                env_file=env_file, base_dir=Path(settings.BASE_DIR),
                var_dir=Path(settings.VAR_DIR), profile_dir=options["profile_dir"],
            )
            given = self._given(options)
            env = setup_wizard.read_env_file(env_file)
            ca_file = env.get("LDAP_CA_FILE", settings.LDAP_CA_FILE)
            timeout = settings.LDAP_TIMEOUT
            test = None
            if not options["skip_ldap_test"]:
                def test(values):
                    return setup_wizard.check_directory(values, ca_file=ca_file,
                                                        timeout=timeout)
            wizard = setup_wizard.Wizard(
                _Terminal(self, options.get("stdin") or sys.stdin),
                given=given,
                previous=setup_wizard.previous_answers(locations),
                interactive=not options["no_input"],
                test_directory=test,
            )
            answers = wizard.run()
            setup_wizard.save(answers, locations)
        except WizardError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(
            f"Written: {locations.env_file} (mode 0600) and the profile "
            f"{locations.profile_file}.\nRestart the filter and the web viewer to use them; "
            "`manage.py postfixconfig` prints the matching Postfix settings."
        )

    def _given(self, options) -> dict[str, str]:
        given = {q.key: options[q.key] for q in QUESTIONS if options.get(q.key) is not None}
        path = given.get("ldap_bind_password")
        if path is not None:
            try:
                given["ldap_bind_password"] = Path(path).read_text(encoding="utf-8").rstrip(
                    "\r\n")
            except (OSError, UnicodeDecodeError) as exc:
                raise WizardError(f"--ldap-bind-password-file {path}: cannot read ({exc})"
                                  ) from None
        return given
