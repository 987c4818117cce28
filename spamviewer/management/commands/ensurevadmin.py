import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from spamviewer.env import env_secret


class Command(BaseCommand):
    help = (
        "Create the vadmin superuser if it does not exist, with VADMIN_PASSWORD or a random "
        "password printed once."
    )

    def handle(self, *args, **options) -> None:
        User = get_user_model()
        name = settings.VADMIN_USERNAME
        if User.objects.filter(username=name).exists():
            self.stdout.write(f"{name} exists already; its password is unchanged.")
            return
        password = env_secret("VADMIN_PASSWORD")
        generated = not password
        if generated:
            password = secrets.token_urlsafe(12)
        else:
            # The password policy every other password here meets.
            try:
                validate_password(password, User(username=name))
            except ValidationError as exc:
                raise CommandError(
                    "VADMIN_PASSWORD is refused: " + " ".join(exc.messages)
                ) from exc
        User.objects.create_superuser(username=name, email="", password=password)
        if generated:
            self.stdout.write(
                self.style.WARNING(
                    f"Created {name} with the password: {password}\n"
                    "It is shown only this once; change it in the console."
                )
            )
        else:
            self.stdout.write(f"Created {name} with the password from VADMIN_PASSWORD.")
