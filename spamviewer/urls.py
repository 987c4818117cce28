from django.contrib.auth import views as auth_views
from django.urls import include, path

from directory.auth import LoginView
from spamviewer import views

urlpatterns = [
    path("login/", LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("healthz", views.healthz, name="healthz"),
    path("console/", include("directory.urls")),
    path("", include("quarantine.urls")),
]

handler400 = "spamviewer.views.bad_request"
handler403 = "spamviewer.views.permission_denied"
handler404 = "spamviewer.views.not_found"
handler500 = "spamviewer.views.server_error"
