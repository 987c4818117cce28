from __future__ import annotations

from django.contrib.auth.models import User
from django.urls import reverse

from directory.models import Address

URL = reverse("directory:user_add")
GOOD_PASSWORD = "a long enough passphrase"


def _post(client, **overrides):
    data = {
        "username": "carol",
        "password1": GOOD_PASSWORD,
        "password2": GOOD_PASSWORD,
        "addresses": "carol@example.test\n",
    }
    data.update(overrides)
    return client.post(URL, data)


def test_add_user_form_is_shown_to_vadmin(client, world):
    client.force_login(world.vadmin)
    response = client.get(URL)
    assert response.status_code == 200
    html = response.content.decode()
    for field in ("username", "password1", "password2", "addresses"):
        assert f'name="{field}"' in html


def test_add_user_creates_a_local_user_with_lowercased_addresses(client, world):
    client.force_login(world.vadmin)
    response = _post(client, addresses="Carol@Example.TEST\n\n  CAROL.Two@example.test \n"
                                       "carol@example.test\n")
    assert response.status_code == 302
    assert response["Location"] == reverse("directory:users")
    carol = User.objects.get(username="carol")
    assert carol.check_password(GOOD_PASSWORD)
    assert not carol.is_staff and not carol.is_superuser
    assert sorted(Address.objects.filter(user=carol).values_list("address", "source")) == [
        ("carol.two@example.test", "local"),
        ("carol@example.test", "local"),
    ]


def test_an_address_of_another_user_is_an_error_naming_the_owner(client, world):
    client.force_login(world.vadmin)
    response = _post(client, addresses="carol@example.test\nBOB@example.test\n")
    assert response.status_code == 200
    assert "bob@example.test belongs to bob" in response.content.decode()
    assert not User.objects.filter(username="carol").exists()
    assert not Address.objects.filter(address="carol@example.test").exists()


def test_an_invalid_address_is_refused(client, world):
    client.force_login(world.vadmin)
    response = _post(client, addresses="carol@example.test\nnot an address\n")
    assert "not an address is not a valid e-mail address" in response.content.decode()
    assert not User.objects.filter(username="carol").exists()


def test_password_validators_refuse_password(client, world):
    client.force_login(world.vadmin)
    response = _post(client, password1="password", password2="password")
    assert response.status_code == 200
    assert "This password is too common." in response.content.decode()
    assert not User.objects.filter(username="carol").exists()


def test_mismatched_passwords_are_refused(client, world):
    client.force_login(world.vadmin)
    response = _post(client, password2=GOOD_PASSWORD + "x")
    assert "didn’t match" in response.content.decode()
    assert not User.objects.filter(username="carol").exists()


def test_an_existing_username_in_another_case_is_refused(client, world):
    client.force_login(world.vadmin)
    response = _post(client, username="Bob", addresses="")
    assert "already exists" in response.content.decode()
    assert User.objects.filter(username__iexact="bob").count() == 1


def test_add_user_answers_404_with_ldap_logins(client, world, settings):
    settings.LOGIN_METHOD = "ldap"
    client.force_login(world.vadmin)
    assert client.get(URL).status_code == 404
    assert _post(client).status_code == 404
    assert not User.objects.filter(username="carol").exists()
