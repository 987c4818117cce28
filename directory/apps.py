from django.apps import AppConfig


class DirectoryConfig(AppConfig):
    name = "directory"
    verbose_name = "Users and addresses"

    def ready(self) -> None:
        from directory import checks  # noqa: F401  (registers the system checks)
