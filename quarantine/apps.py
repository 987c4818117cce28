from django.apps import AppConfig


class QuarantineConfig(AppConfig):
    name = "quarantine"
    verbose_name = "Quarantine"

    def ready(self) -> None:
        from quarantine import checks  # noqa: F401  (registers the system checks)
