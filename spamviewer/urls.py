from django.contrib.auth import views as auth_views
from django.urls import include, path

from spamviewer import views

urlpatterns = [
    path(
        "login/",
        auth_views.LoginView.as_view(template_name="login.html", redirect_authenticated_user=True),
        name="login",
    ),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("healthz", views.healthz, name="healthz"),
    path("console/", include("directory.urls")),
    path("", include("quarantine.urls")),
]

handler404 = "spamviewer.views.not_found"
handler500 = "spamviewer.views.server_error"
