from django.urls import path

from quarantine import views

app_name = "quarantine"

urlpatterns = [
    path("", views.message_list, name="list"),
]
