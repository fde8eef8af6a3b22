"""The lease journal on disk."""

from workers.journal import Journal


def test_journal_round_trip(tmp_path):
    journal = Journal(tmp_path / "j.json")
    journal.add_lease("ck:ipc:1", {"type": "ipc", "pin": "/run/x/1"})
    journal.checkpoint_refs = 2
    journal.save()

    loaded = Journal(tmp_path / "j.json").load()
    assert loaded.leases == {"ck:ipc:1": {"type": "ipc", "pin": "/run/x/1"}}
    assert loaded.checkpoint_refs == 2
    assert loaded.leased_pins() == {"/run/x/1"}


def test_journal_remove_lease(tmp_path):
    journal = Journal(tmp_path / "j.json")
    journal.add_lease("ck:uts:1", {"type": "uts", "pin": "/p"})
    journal.remove_lease("ck:uts:1")
    assert Journal(tmp_path / "j.json").load().leases == {}


def test_journal_missing_is_empty(tmp_path):
    journal = Journal(tmp_path / "absent.json").load()
    assert journal.leases == {}
    assert journal.checkpoint_refs == 0


def test_journal_unreadable_moved_aside(tmp_path):
    path = tmp_path / "j.json"
    path.write_text("{not json")
    journal = Journal(path).load()
    assert journal.leases == {}
    assert (tmp_path / "j.broken").read_text() == "{not json"
    assert not path.exists()
