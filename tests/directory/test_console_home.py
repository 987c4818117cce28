from __future__ import annotations

from django.urls import reverse

URL = reverse("directory:console")


def test_vadmin_sees_the_console_links_and_the_clear_form(client, world):
    client.force_login(world.vadmin)
    response = client.get(URL)
    assert response.status_code == 200
    html = response.content.decode()
    for name in ("directory:users", "directory:user_add", "directory:password",
                 "directory:audit", "directory:clear"):
        assert f'href="{reverse(name)}"' in html or f'action="{reverse(name)}"' in html, name
    assert "Clear quarantine" in html
    assert 'name="confirm"' in html


def test_add_user_link_is_absent_with_ldap_logins(client, world, settings):
    settings.LOGIN_METHOD = "ldap"
    client.force_login(world.vadmin)
    html = client.get(URL).content.decode()
    assert reverse("directory:user_add") not in html
    assert "Add user" not in html
    assert reverse("directory:users") in html


def test_normal_user_gets_403_and_anonymous_goes_to_login(client, world):
    client.force_login(world.alice)
    assert client.get(URL).status_code == 403
    client.logout()
    response = client.get(URL)
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login") + "?next=")


def test_the_navigation_links_to_the_console_only_for_vadmin(client, world):
    client.force_login(world.vadmin)
    assert f'href="{URL}"' in client.get(URL).content.decode()
    client.force_login(world.alice)
    assert f'href="{URL}"' not in client.get(reverse("quarantine:list")).content.decode()
