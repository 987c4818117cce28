"""A quarantine store whose disk is full, behind real Postfix: Postfix keeps the message
queued on the worker's 451 and, once the disk has room again, the message it retries is
kept exactly once.

Needs root (Postfix's master, mount) and the postfix package.
"""

from __future__ import annotations

import pytest

from quarantine.indexer import index_directory
from quarantine.models import Message
from quarantine.sink import DjangoQuarantineSink
from quarantine.store import FileStore
from tests.conftest import build_mail
from tests.e2e.postfix import chain_factory, requires_postfix
from tests.e2e.test_postfix_filter import deferred
from tests.mailfilter.conftest import QuarantineEverything
from tests.quarantine.test_disk_faults_edges import remount, store_files, tmpfs

pytestmark = requires_postfix
postfix_chain = pytest.fixture(chain_factory, name="postfix_chain")


def test_full_quarantine_disk_keeps_the_message_queued_then_stores_it_once(
    postfix_chain, transactional_db, tmp_path
):
    # Big enough not to fit, with text that does not compress (VIRUS files are plain).
    body = "".join(f"{n:08d} {n * 7919 % 104729:06d} {'x' * (n % 50)}\n" for n in range(8000))
    message = build_mail(subject="kept once", body=body)
    with tmpfs(tmp_path / "q", size="128k") as root:
        chain = postfix_chain(
            sink=DjangoQuarantineSink(FileStore(root)),
            policy=QuarantineEverything(destiny="discard", category="VIRUS",
                                        reasons=("Eicar-Test-Signature",)),
        )
        chain.send(message)
        deferred(chain, "451 4.3.0 Cannot keep a copy")
        assert store_files(root) == []
        assert Message.objects.count() == 0

        remount(root, "size=8m")
        chain.postfix.flush()
        assert chain.queue_empty(timeout=60), chain.postfix.log()[-2000:]
        assert list(Message.objects.values_list("subject", flat=True)) == ["kept once"]
        assert len(store_files(root)) == 1
        assert index_directory(root).new == 0
        assert chain.sink.dumps() == []
