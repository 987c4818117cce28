from django.urls import path, register_converter

from quarantine import views


class MailIdConverter:
    """amavisd-new mail_ids only: anything else (dots, slashes, NUL, length) never matches,
    so a URL cannot name a file; the file is found through the database row."""

    regex = "[A-Za-z0-9][A-Za-z0-9_+-]{6,30}[A-Za-z0-9]"

    def to_python(self, value: str) -> str:
        return value

    def to_url(self, value: str) -> str:
        return value


register_converter(MailIdConverter, "mailid")

app_name = "quarantine"

urlpatterns = [
    path("", views.message_list, name="list"),
    path("delete-all", views.delete_all, name="delete-all"),
    path("message/<mailid:mail_id>/", views.message_detail, name="detail"),
    path("message/<mailid:mail_id>/download", views.download, name="download"),
    path("message/<mailid:mail_id>/release", views.release, name="release"),
    path("message/<mailid:mail_id>/delete", views.delete, name="delete"),
]
