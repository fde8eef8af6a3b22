"""The lease journal on disk."""

from workers.journal import Journal


def test_journal_round_trip(tmp_path):
    journal = Journal(tmp_path / "ck").load()
    journal.add_lease("ck:ipc:1", {"type": "ipc", "pin": "/run/x/1"})
    journal.checkpoint_refs = 2
    journal.save()

    loaded = Journal(tmp_path / "ck").load()
    assert loaded.leases == {"ck:ipc:1": {"type": "ipc", "pin": "/run/x/1"}}
    assert loaded.checkpoint_refs == 2
    assert loaded.leased_pins() == {"/run/x/1"}


def test_journal_remove_lease(tmp_path):
    journal = Journal(tmp_path / "ck").load()
    journal.add_lease("ck:uts:1", {"type": "uts", "pin": "/p"})
    journal.remove_lease("ck:uts:1")
    assert Journal(tmp_path / "ck").load().leases == {}
    assert list((tmp_path / "ck" / "leases").iterdir()) == []


def test_journal_missing_is_empty(tmp_path):
    journal = Journal(tmp_path / "absent").load()
    assert journal.leases == {}
    assert journal.checkpoint_refs == 0


def test_journal_interrupted_write_dropped(tmp_path):
    leases = tmp_path / "ck" / "leases"
    leases.mkdir(parents=True)
    (leases / ".ck:ipc:2.json.tmp").write_text('{"type": "ip')
    journal = Journal(tmp_path / "ck").load()
    assert journal.leases == {}
    assert list(leases.iterdir()) == []


def test_journal_damaged_entry_kept(tmp_path):
    leases = tmp_path / "ck" / "leases"
    leases.mkdir(parents=True)
    (leases / "ck:ipc:3.json").write_text("{not json")
    journal = Journal(tmp_path / "ck").load()
    assert journal.leases == {}
    assert (leases / "ck:ipc:3.json").exists()
