from __future__ import annotations

from django.urls import reverse

from tests.conftest import PASSWORD

URL = reverse("directory:password")
NEW_PASSWORD = "another long passphrase"


def test_password_page_asks_for_the_old_and_new_password(client, world):
    client.force_login(world.vadmin)
    html = client.get(URL).content.decode()
    for field in ("old_password", "new_password1", "new_password2"):
        assert f'name="{field}"' in html


def test_vadmin_changes_its_password_and_stays_logged_in(client, world):
    client.force_login(world.vadmin)
    response = client.post(URL, {
        "old_password": PASSWORD,
        "new_password1": NEW_PASSWORD,
        "new_password2": NEW_PASSWORD,
    })
    assert response.status_code == 302
    assert response["Location"] == reverse("directory:console")
    world.vadmin.refresh_from_db()
    assert world.vadmin.check_password(NEW_PASSWORD)
    assert client.get(reverse("directory:console")).status_code == 200


def test_a_wrong_old_password_changes_nothing(client, world):
    client.force_login(world.vadmin)
    response = client.post(URL, {
        "old_password": "not it",
        "new_password1": NEW_PASSWORD,
        "new_password2": NEW_PASSWORD,
    })
    assert response.status_code == 200
    assert "Your old password was entered incorrectly" in response.content.decode()
    world.vadmin.refresh_from_db()
    assert world.vadmin.check_password(PASSWORD)


def test_password_validators_refuse_password(client, world):
    client.force_login(world.vadmin)
    response = client.post(URL, {
        "old_password": PASSWORD,
        "new_password1": "password",
        "new_password2": "password",
    })
    assert "This password is too common." in response.content.decode()
    world.vadmin.refresh_from_db()
    assert world.vadmin.check_password(PASSWORD)
