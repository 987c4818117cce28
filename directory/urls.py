from django.urls import path

from directory import views

app_name = "directory"

# Every page here is vadmin's: each view carries views.vadmin_required, and
# tests/test_vadmin_only_urls.py requests every pattern of this list as a normal user.
urlpatterns = [
    path("", views.console, name="console"),
    path("clear/", views.clear, name="clear"),
    path("users/", views.user_list, name="users"),
    path("users/add/", views.user_add, name="user_add"),
    path("users/<int:user_id>/", views.user_edit, name="user_edit"),
    path("users/<int:user_id>/delete/", views.user_delete, name="user_delete"),
    path("password/", views.password, name="password"),
    path("audit/", views.audit, name="audit"),
]
