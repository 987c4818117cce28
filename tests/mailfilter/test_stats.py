"""Counters, the Prometheus endpoint and `manage.py filterstats`."""

from __future__ import annotations

import smtplib
import urllib.request

import pytest
from django.core.management import CommandError, call_command

from mailfilter.stats import Stats

from .conftest import free_port


def test_metrics_endpoint_counts_what_the_worker_did(start_filter, next_hop, raw):
    worker = start_filter(metrics_host="127.0.0.1", metrics_port=0, bare_lf="reject")
    with smtplib.SMTP("127.0.0.1", worker.port) as client:
        client.sendmail("a@remote.example", ["alice@example.test"], b"Subject: s\r\n\r\nb\r\n")
    client = raw(worker.port)
    client.reply()
    client.command(b"EHLO client.test")
    client.command(b"STARTTLS")
    client.command(b"MAIL FROM:<a@remote.example>")
    client.command(b"RCPT TO:<alice@example.test>")
    client.command(b"DATA")
    assert client.command(b"bare\nLF\r\n.")[:3] == b"550"
    url = f"http://127.0.0.1:{worker.server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    assert "spamviewer_filter_connections_total 2" in text
    assert "spamviewer_filter_messages_passed_total 1" in text
    assert "spamviewer_filter_tls_attempts_total 1" in text
    assert 'spamviewer_filter_messages_rejected_total{reason="bare"} 1' in text
    assert 'spamviewer_filter_protocol_errors_total{kind="bare_cr_lf"} 1' in text
    assert "spamviewer_filter_next_hop_attempts_total 2" in text
    assert "# TYPE spamviewer_filter_bytes_received_total counter" in text


def test_metrics_endpoint_answers_404_elsewhere(start_filter):
    worker = start_filter(metrics_host="127.0.0.1", metrics_port=0)
    url = f"http://127.0.0.1:{worker.server.metrics_port}/admin"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(url, timeout=5)
    info.value.close()
    assert info.value.code == 404


def test_filterstats_prints_the_counters_of_a_running_worker(start_filter, next_hop, capsys):
    worker = start_filter(metrics_host="127.0.0.1", metrics_port=0)
    with smtplib.SMTP("127.0.0.1", worker.port) as client:
        client.sendmail("a@remote.example", ["alice@example.test"], b"Subject: s\r\n\r\nb\r\n")
    call_command("filterstats", address=f"127.0.0.1:{worker.server.metrics_port}")
    lines = capsys.readouterr().out.splitlines()
    assert "messages_passed_total 1" in lines
    assert "connections_total 1" in lines


def test_filterstats_names_the_endpoint_it_cannot_reach():
    port = free_port()
    with pytest.raises(CommandError, match=f"127.0.0.1:{port}"):
        call_command("filterstats", address=f"127.0.0.1:{port}")


def test_snapshots_of_several_processes_add_up_per_label():
    """The parent of several worker processes renders the sums of their snapshots: per
    counter and per label, with counters nobody counted at 0."""
    first, second = Stats(), Stats()
    first.inc("connections", 3)
    first.inc("messages_quarantined", label="SPAM")
    second.inc("connections", 4)
    second.inc("messages_quarantined", label="SPAM")
    second.inc("messages_quarantined", label="VIRUS")
    total = Stats()
    total.add(first.snapshot())
    total.add(second.snapshot())
    text = total.render()
    assert "spamviewer_filter_connections_total 7" in text
    assert 'spamviewer_filter_messages_quarantined_total{category="SPAM"} 2' in text
    assert 'spamviewer_filter_messages_quarantined_total{category="VIRUS"} 1' in text
    assert "spamviewer_filter_tls_attempts_total 0" in text
