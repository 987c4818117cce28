"""A profile's scored rules on headers, decoded texts and the envelope."""

from __future__ import annotations

from mailfilter.checks.rules import (
    check_body_rules,
    check_from,
    check_header_rules,
    check_realname,
    check_rules,
    check_to_cc,
)
from mailfilter.profiles import parse_profile

HEADERS = [
    ("From", '"Alice Example" <alice@example.org>'),
    ("To", "bob@example.com, Carol <carol@example.com>"),
    ("Cc", "dave@example.com"),
    ("Subject", "Quarterly figures"),
    ("X-Mailer", "Gold Mailer\r\n 2.0"),
    ("Precedence", "bulk"),
]


def profile(text: str):
    return parse_profile(text, name="test")


def names(findings):
    return [finding.name for finding in findings]


def test_header_reject_finds_its_key_in_the_named_field_case_sensitively():
    found = check_header_rules(HEADERS, profile=profile("header_reject=2,Precedence:bulk\n"))
    assert names(found) == ["header_reject"]
    assert found[0].score == 2 and found[0].category == "SPAM"
    assert check_header_rules(HEADERS, profile=profile("header_reject=Precedence:BULK\n")) == []


def test_header_rejecti_ignores_case_in_the_key_and_the_field_name():
    found = check_header_rules(HEADERS, profile=profile("header_rejecti=1,x-mailer:GOLD\n"))
    assert names(found) == ["header_rejecti"]


def test_header_rules_look_only_at_the_named_field():
    assert check_header_rules(HEADERS, profile=profile("header_rejecti=Subject:bulk\n")) == []


def test_header_rules_match_across_a_folded_value():
    found = check_header_rules(HEADERS, profile=profile("header_reject=X-Mailer:Mailer 2.0\n"))
    assert names(found) == ["header_reject"]


def test_header_rule_with_slashes_is_a_regular_expression():
    rules = profile("header_rejecti=1,Subject:/^quarterly\\s+fig/\n")
    assert names(check_header_rules(HEADERS, profile=rules)) == ["header_rejecti"]
    anchored = profile("header_rejecti=1,Subject:/^figures/\n")
    assert check_header_rules(HEADERS, profile=anchored) == []


def test_body_reject_is_case_sensitive_and_searches_every_part():
    rules = profile("body_reject=3,FREE\n")
    assert names(check_body_rules(["hello", "get it FREE"], profile=rules)) == ["body_reject"]
    assert check_body_rules(["get it free"], profile=rules) == []


def test_body_rejecti_ignores_case_and_counts_once_per_message():
    rules = profile("body_rejecti=viagra\n")
    found = check_body_rules(["Cheap VIAGRA", "viagra again"], profile=rules)
    assert names(found) == ["body_rejecti"] and found[0].score == 1


def test_body_rules_off_by_default():
    assert check_body_rules(["FREE viagra"], profile=profile("reject=0\n")) == []


def test_to_cc_check_passes_when_every_recipient_is_in_to_or_cc():
    rules = profile("to_cc_check=2,1\n")
    recipients = ["Carol@example.com", "<dave@example.com>"]
    assert check_to_cc(HEADERS, recipients, profile=rules) == []


def test_to_cc_check_fails_for_a_recipient_missing_from_to_and_cc():
    found = check_to_cc(HEADERS, ["bob@example.com", "eve@example.com"], profile=profile(
        "to_cc_check=2,1\n"))
    assert names(found) == ["to_cc_check"] and found[0].score == 2
    assert "eve@example.com" in found[0].detail


def test_to_cc_check_is_off_by_default():
    assert check_to_cc(HEADERS, ["eve@example.com"], profile=profile("reject=0\n")) == []


def test_from_check_wants_the_envelope_sender_in_from():
    rules = profile("from_check=1\n")
    assert check_from(HEADERS, "ALICE@example.org", profile=rules) == []
    assert names(check_from(HEADERS, "mallory@example.net", profile=rules)) == ["from_check"]


def test_from_check_leaves_the_null_sender_alone():
    assert check_from(HEADERS, "", profile=profile("from_check=1\n")) == []


def test_from_check_is_off_by_default():
    assert check_from(HEADERS, "mallory@example.net", profile=profile("reject=0\n")) == []


def test_realname_check_wants_a_name_before_the_angle_address():
    rules = profile("realname_check=1,1\n")
    assert check_realname(HEADERS, profile=rules) == []
    bare = [("From", "alice@example.org")]
    assert names(check_realname(bare, profile=rules)) == ["realname_check"]
    empty = [("From", '"" <alice@example.org>')]
    assert names(check_realname(empty, profile=rules)) == ["realname_check"]
    assert names(check_realname([], profile=rules)) == ["realname_check"]


def test_realname_check_is_off_by_default():
    assert check_realname([("From", "a@example.org")], profile=profile("reject=0\n")) == []


def test_check_rules_sums_every_hit_with_its_score():
    rules = profile(
        "header_reject=2,Precedence:bulk\nbody_rejecti=3,figures\nfrom_check=4,1\n"
        "to_cc_check=1\nrealname_check=1\n"
    )
    found = check_rules(
        HEADERS,
        ["the figures"],
        sender="mallory@example.net",
        recipients=["bob@example.com"],
        profile=rules,
    )
    assert sorted(names(found)) == ["body_rejecti", "from_check", "header_reject"]
    assert sum(finding.score for finding in found) == 9
