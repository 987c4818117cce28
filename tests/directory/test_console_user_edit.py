from __future__ import annotations

from django.urls import reverse

from directory.models import Address

GOOD_PASSWORD = "a new long passphrase"


def _url(user) -> str:
    return reverse("directory:user_edit", args=[user.id])


def _addresses(user) -> dict[str, str]:
    return dict(Address.objects.filter(user=user).values_list("address", "source"))


def test_edit_page_shows_the_local_addresses_and_a_password_field(client, world):
    client.force_login(world.vadmin)
    response = client.get(_url(world.alice))
    assert response.status_code == 200
    html = response.content.decode()
    assert "alice.alias@example.test\nalice@example.test" in html
    assert 'name="password1"' in html


def test_edit_replaces_the_address_set(client, world):
    client.force_login(world.vadmin)
    response = client.post(_url(world.alice),
                           {"addresses": "alice@example.test\nAlice.New@Example.test"},
                           follow=True)
    assert response.redirect_chain[-1][0] == reverse("directory:users")
    assert "added alice.new@example.test; removed alice.alias@example.test" in (
        response.content.decode()
    )
    assert _addresses(world.alice) == {
        "alice@example.test": "local",
        "alice.new@example.test": "local",
    }


def test_edit_refuses_an_address_of_another_user_naming_the_owner(client, world):
    client.force_login(world.vadmin)
    response = client.post(_url(world.alice),
                           {"addresses": "alice@example.test\nbob@example.test"})
    assert response.status_code == 200
    assert "bob@example.test belongs to bob" in response.content.decode()
    assert _addresses(world.bob) == {"bob@example.test": "local"}
    assert "alice.alias@example.test" in _addresses(world.alice)


def test_edit_sets_a_new_password_when_given(client, world):
    client.force_login(world.vadmin)
    response = client.post(_url(world.alice), {
        "addresses": "alice@example.test",
        "password1": GOOD_PASSWORD,
        "password2": GOOD_PASSWORD,
    })
    assert response.status_code == 302
    world.alice.refresh_from_db()
    assert world.alice.check_password(GOOD_PASSWORD)


def test_edit_without_a_password_keeps_the_old_one(client, world):
    from tests.conftest import PASSWORD

    client.force_login(world.vadmin)
    client.post(_url(world.alice), {"addresses": "alice@example.test"})
    world.alice.refresh_from_db()
    assert world.alice.check_password(PASSWORD)


def test_edit_refuses_a_weak_password_and_changes_nothing(client, world):
    client.force_login(world.vadmin)
    response = client.post(_url(world.alice), {
        "addresses": "alice@example.test",
        "password1": "password",
        "password2": "password",
    })
    assert "This password is too common." in response.content.decode()
    world.alice.refresh_from_db()
    assert not world.alice.check_password("password")
    assert "alice.alias@example.test" in _addresses(world.alice)


def test_a_directory_user_has_no_password_field_and_keeps_directory_addresses(client, world):
    Address.objects.create(user=world.alice, address="alice@dir.example.test", source="ldap")
    client.force_login(world.vadmin)
    html = client.get(_url(world.alice)).content.decode()
    assert 'name="password1"' not in html
    assert "<li>alice@dir.example.test</li>" in html
    client.post(_url(world.alice), {
        "addresses": "alice@example.test",
        "password1": GOOD_PASSWORD,
        "password2": GOOD_PASSWORD,
    })
    world.alice.refresh_from_db()
    assert not world.alice.check_password(GOOD_PASSWORD)
    assert _addresses(world.alice) == {
        "alice@example.test": "local",
        "alice@dir.example.test": "ldap",
    }


def test_vadmin_editing_itself_gets_no_password_field(client, world):
    client.force_login(world.vadmin)
    html = client.get(_url(world.vadmin)).content.decode()
    assert 'name="password1"' not in html
    assert reverse("directory:password") in html


def test_editing_an_unknown_user_is_404(client, world):
    client.force_login(world.vadmin)
    assert client.get(reverse("directory:user_edit", args=[999999])).status_code == 404
