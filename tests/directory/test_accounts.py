from __future__ import annotations

import pytest
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError

from directory import accounts
from directory.models import Address
from quarantine.models import Message, Recipient


def _addresses(user: User) -> dict[str, str]:
    return dict(Address.objects.filter(user=user).values_list("address", "source"))


def test_clean_addresses_lowercases_drops_blanks_and_collapses_duplicates():
    cleaned = accounts.clean_addresses(
        ["  Carol@Example.TEST ", "", "   ", "<carol@example.test>", "c2@example.test"]
    )
    assert cleaned == ["carol@example.test", "c2@example.test"]


def test_clean_addresses_names_every_invalid_value():
    with pytest.raises(ValidationError) as info:
        accounts.clean_addresses(["ok@example.test", "not an address", "x@", "a\r\nb@x.test"])
    text = " ".join(info.value.messages)
    assert "not an address is not a valid" in text
    assert "x@ is not a valid" in text
    assert len(info.value.messages) == 3


def test_set_addresses_adds_and_removes_and_reports_the_change(world):
    change = accounts.set_addresses(
        world.alice, ["alice@example.test", "ALICE.new@Example.test"]
    )
    assert change.added == ["alice.new@example.test"]
    assert change.removed == ["alice.alias@example.test"]
    assert change.kept == ["alice@example.test"]
    assert _addresses(world.alice) == {
        "alice@example.test": "local",
        "alice.new@example.test": "local",
    }


def test_set_addresses_refuses_another_users_address_and_changes_nothing(world):
    with pytest.raises(accounts.AddressConflict) as info:
        accounts.set_addresses(world.alice, ["new@example.test", "Bob@Example.test"])
    assert str(info.value) == "bob@example.test belongs to bob"
    assert info.value.owner == "bob"
    assert _addresses(world.alice) == {
        "alice@example.test": "local",
        "alice.alias@example.test": "local",
    }
    assert _addresses(world.bob) == {"bob@example.test": "local"}


def test_set_addresses_of_one_source_leaves_the_other_sources_addresses(world):
    Address.objects.create(user=world.alice, address="alice@dir.example.test", source="ldap")
    accounts.set_addresses(world.alice, ["alice@example.test"], source="local")
    assert _addresses(world.alice) == {
        "alice@example.test": "local",
        "alice@dir.example.test": "ldap",
    }
    change = accounts.set_addresses(world.alice, [], source="ldap")
    assert change.removed == ["alice@dir.example.test"]
    assert _addresses(world.alice) == {"alice@example.test": "local"}


def test_create_local_user_stores_password_and_lowercased_addresses(world):
    user = accounts.create_local_user("carol", "a long enough passphrase", ["Carol@Example.TEST"])
    assert user.check_password("a long enough passphrase")
    assert not user.is_superuser
    assert _addresses(user) == {"carol@example.test": "local"}


def test_create_local_user_creates_nothing_when_an_address_is_taken(world):
    with pytest.raises(accounts.AddressConflict):
        accounts.create_local_user("carol", "a long enough passphrase",
                                   ["carol@example.test", "bob@example.test"])
    assert not User.objects.filter(username="carol").exists()
    assert not Address.objects.filter(address="carol@example.test").exists()


def test_create_local_user_refuses_a_username_that_differs_only_in_case(world):
    with pytest.raises(accounts.UsernameTaken):
        accounts.create_local_user("Alice", "a long enough passphrase", [])


def test_delete_user_removes_addresses_but_keeps_their_mail(world, make_message):
    message = make_message(recipients=["alice@example.test"])
    accounts.delete_user(world.alice)
    assert not User.objects.filter(username="alice").exists()
    assert not Address.objects.filter(address__startswith="alice").exists()
    assert Message.objects.filter(pk=message.pk).exists()
    assert Recipient.objects.filter(address="alice@example.test").count() == 1


def test_delete_user_refuses_the_superuser(world):
    with pytest.raises(accounts.ProtectedUser):
        accounts.delete_user(world.vadmin)
    assert User.objects.filter(username="vadmin").exists()


def test_a_user_with_directory_addresses_has_no_local_password(world):
    assert accounts.has_local_password(world.alice)
    Address.objects.create(user=world.alice, address="alice@dir.example.test", source="ldap")
    assert not accounts.has_local_password(world.alice)
    world.bob.set_unusable_password()
    world.bob.save()
    assert not accounts.has_local_password(world.bob)


def test_users_with_counts_counts_addresses_and_quarantine_rows(world, make_message,
                                                                 django_assert_num_queries):
    make_message(recipients=["alice@example.test"])
    make_message(recipients=["alice.alias@example.test", "bob@example.test"])
    make_message(recipients=["nobody@example.test"])
    with django_assert_num_queries(1):
        counts = {u.username: (u.address_count, u.message_count)
                  for u in accounts.users_with_counts()}
    assert counts == {"alice": (2, 2), "bob": (1, 1), "vadmin": (0, 0)}
