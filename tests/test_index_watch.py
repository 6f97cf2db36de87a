"""`clap index DIR --watch`: a real `clap` process watching a folder keeps its index current as files arrive,
change and go, leaves a vanished root's files alone, and stops cleanly on SIGINT and SIGTERM; its event filter
and debounce (in-process, fed watchdog's own event objects) ignore what the scan would not index and wait for a
file that is still being written."""

from __future__ import annotations

import json
import os
import queue
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest

from audio_synth import tone_noise, write_audio
from cli_runner import clap
from entry_point import clap_executable

TIMEOUT = 30.0  # seconds an update may take to show up


def write_tone(path: Path, seconds: float, seed: int) -> None:
    write_audio(path, tone_noise(seconds, 16_000, seed=seed), 16_000, format="WAV", subtype="PCM_16")


def stored(index_dir: Path) -> dict[str, float]:
    """{path: duration} of the files an index holds, read as another process sees its last commit."""
    con = sqlite3.connect(f"file:{index_dir / 'index.sqlite'}?mode=ro", uri=True, timeout=5)
    try:
        return dict(con.execute("SELECT path, duration FROM files"))
    finally:
        con.close()


class Watcher:
    """`clap index ROOT --index IDX --watch --debounce 0.5 --json` in a subprocess; `update()` returns its next
    JSON object (one per update)."""

    def __init__(self, root: Path, index_dir: Path, *extra):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [clap_executable(), "index", str(root), "--index", str(index_dir), "--watch", "--debounce", "0.5",
             "--json", "--workers", "0", *map(str, extra)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)

    def update(self) -> dict:
        try:
            return json.loads(self.lines.get(timeout=TIMEOUT))
        except queue.Empty:
            self.proc.kill()
            pytest.fail(f"no update within {TIMEOUT} s; stderr: {self.proc.stderr.read()[-3000:]}")

    def stop(self, signum: int) -> tuple[int, str]:
        self.proc.send_signal(signum)
        try:
            code = self.proc.wait(timeout=TIMEOUT)
        finally:
            self.proc.kill()
        return code, self.proc.stderr.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def library(tmp_path):
    root = tmp_path / "lib"
    root.mkdir()
    write_tone(root / "a.wav", 1.0, seed=1)
    write_tone(root / "b.wav", 1.5, seed=2)
    return root


def test_watch_adds_changed_files_and_prunes_deleted_ones_then_stops_on_sigint(library, tiny_model_dir, tmp_path):
    from clapcli.index.lock import WriterLock

    index_dir = tmp_path / "idx"
    watcher = Watcher(library, index_dir, "--model", tiny_model_dir)
    try:
        first = watcher.update()
        assert (first["added"], first["total_files"]) == (2, 2)

        # a download: written under a temporary name (ignored), then renamed into place
        write_tone(library / "new.wav.part", 2.0, seed=3)
        os.replace(library / "new.wav.part", library / "new.wav")
        added = watcher.update()
        assert (added["added"], added["updated"], added["removed"]) == (1, 0, 0)
        assert stored(index_dir)[str((library / "new.wav").resolve())] == pytest.approx(2.0, abs=1e-3)

        write_tone(library / "a.wav", 0.7, seed=4)
        updated = watcher.update()
        assert (updated["added"], updated["updated"], updated["removed"]) == (0, 1, 0)
        assert stored(index_dir)[str((library / "a.wav").resolve())] == pytest.approx(0.7, abs=1e-3)

        # a rename while watched: the file keeps its vectors (moved), nothing is embedded
        (library / "sub").mkdir()
        os.replace(library / "new.wav", library / "sub" / "renamed.wav")
        moved = watcher.update()
        while not moved["moved"]:  # (the new folder may bring an update of its own first)
            assert moved["added"] == 0 and moved["removed"] == 0
            moved = watcher.update()
        assert (moved["added"], moved["updated"], moved["removed"], moved["moved"]) == (0, 0, 0, 1)

        (library / "b.wav").unlink()
        removed = watcher.update()
        assert (removed["added"], removed["updated"], removed["removed"]) == (0, 0, 1)
        assert sorted(stored(index_dir)) == sorted(str((library / n).resolve()) for n in ("a.wav", "sub/renamed.wav"))

        code, stderr = watcher.stop(signal.SIGINT)
    finally:
        watcher.close()
    assert code == 0, stderr
    assert "Traceback" not in stderr
    with WriterLock(index_dir):  # released: taken at once, without waiting
        pass
    again = json.loads(clap("index", library, "--index", index_dir, "--json").stdout.splitlines()[-1])
    assert (again["added"], again["updated"], again["removed"], again["unchanged"]) == (0, 0, 0, 2)


def test_a_vanished_root_prunes_nothing_and_sigterm_mid_update_keeps_what_it_committed(library, tiny_model_dir,
                                                                                         tmp_path):
    index_dir = tmp_path / "idx"
    clap("index", library, "--index", index_dir, "--model", tiny_model_dir)
    before = stored(index_dir)
    # nothing to embed at first: the watch starts without loading the model
    watcher = Watcher(library, index_dir, "--commit-every", "1", "--batch-size", "1")
    try:
        first = watcher.update()
        assert (first["added"], first["unchanged"], first["missing_roots"]) == (0, 2, [])

        ejected = tmp_path / "elsewhere"
        library.rename(ejected)  # the card is ejected: its folder is gone
        gone = watcher.update()
        assert gone["missing_roots"] == [str(library.resolve())] and gone["removed"] == 0
        assert stored(index_dir) == before

        ejected.rename(library)  # and back, with one file more
        write_tone(library / "c.wav", 0.5, seed=5)
        back = watcher.update()
        while back["missing_roots"] or not back["added"]:  # (the return may be seen before the new file)
            assert back["removed"] == 0
            back = watcher.update()
        assert (back["added"], back["removed"], back["missing_roots"]) == (1, 0, [])

        # a card full of takes arrives; SIGTERM once the update has committed the first of them
        (library / "takes").mkdir()
        for i in range(12):
            write_tone(library / "takes" / f"t{i:02d}.wav", 8.0, seed=10 + i)
        deadline = time.monotonic() + TIMEOUT
        while len(stored(index_dir)) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        code, stderr = watcher.stop(signal.SIGTERM)
    finally:
        watcher.close()
    assert code == 0, stderr
    assert "interrupted:" in stderr and "Traceback" not in stderr
    committed = stored(index_dir)
    assert 4 <= len(committed) < 15, "the update finished before SIGTERM"
    again = json.loads(clap("index", library, "--index", index_dir, "--json").stdout.splitlines()[-1])
    assert (again["added"], again["removed"], again["total_files"]) == (15 - len(committed), 0, 15)


def test_events_the_scan_would_not_index_start_no_update(tmp_path):
    from watchdog.events import DirCreatedEvent, FileCreatedEvent, FileModifiedEvent, FileOpenedEvent

    from clapcli.index.watch import _Changes

    root = tmp_path / "lib"
    index_dir = root / ".clap-index"  # an index kept inside the folder it indexes
    (root / "skip").mkdir(parents=True)
    changes = _Changes([root], index_dir, exclude=["skip"])
    for event in (FileCreatedEvent(str(root / "take.wav.part")), FileCreatedEvent(str(root / "take.wav.crdownload")),
                  FileModifiedEvent(str(root / "take.wav~")), FileCreatedEvent(str(root / "skip" / "take.wav")),
                  FileModifiedEvent(str(index_dir / "index.sqlite")), FileCreatedEvent(str(index_dir / "x.wav")),
                  FileOpenedEvent(str(root / "take.wav")), DirCreatedEvent(str(root / "new")),
                  FileCreatedEvent(str(tmp_path / "outside.wav"))):
        changes.dispatch(event)
    assert not changes.wait_until_quiet(debounce=0.0, timeout=0.1)

    changes.dispatch(FileCreatedEvent(str(root / "take.wav")))
    assert changes.wait_until_quiet(debounce=0.0, timeout=0.1)
    assert not changes.wait_until_quiet(debounce=0.0, timeout=0.1)  # taken


def test_a_file_still_being_written_waits(tmp_path):
    from watchdog.events import FileModifiedEvent

    from clapcli.index.watch import _Changes

    path = tmp_path / "take.wav"
    path.write_bytes(b"RIFF" + bytes(1000))
    changes = _Changes([tmp_path], tmp_path / "idx", exclude=[])
    changes.dispatch(FileModifiedEvent(str(path)))
    with path.open("ab") as f:  # a write whose event is still to come: the size moved since the event
        f.write(bytes(1000))
    started = time.monotonic()
    assert not changes.wait_until_quiet(debounce=0.3, timeout=0.5)  # quiet for 0.3 s, but the size changed
    assert time.monotonic() - started >= 0.5
    assert changes.wait_until_quiet(debounce=0.3, timeout=1.0)  # unchanged since: settled


def test_reading_a_file_is_no_change_but_a_chmod_is(tmp_path):
    """The indexer reading a changed file updates its access time (IN_ATTRIB: a "modified" event): that must
    not bring another update, while a chmod, which can make a skipped file readable, must."""
    from watchdog.events import FileModifiedEvent

    from clapcli.index.watch import _Changes

    path = tmp_path / "take.wav"
    path.write_bytes(b"RIFF" + bytes(1000))
    changes = _Changes([tmp_path], tmp_path / "idx", exclude=[])
    changes.dispatch(FileModifiedEvent(str(path)))
    assert changes.wait_until_quiet(debounce=0.0, timeout=0.1)

    path.read_bytes()
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns + 10**9, st.st_mtime_ns))  # read: only the access time moves
    changes.dispatch(FileModifiedEvent(str(path)))
    assert not changes.wait_until_quiet(debounce=0.0, timeout=0.1)

    path.chmod(0o600 if st.st_mode & 0o077 else 0o644)
    changes.dispatch(FileModifiedEvent(str(path)))
    assert changes.wait_until_quiet(debounce=0.0, timeout=0.1)


def test_the_session_loads_its_model_once(tiny_model_dir, tmp_path):
    from clapcli.index.build import IndexRequest
    from clapcli.index.watch import _SessionLoader

    loader = _SessionLoader(IndexRequest(tmp_path / "idx", model=str(tiny_model_dir), device="cpu"))
    model = loader(str(tiny_model_dir))
    assert loader(str(tiny_model_dir)) is model  # the next run asks by the name it was given
    assert loader(model.model_ref) is model  # or by the name the index stored


def test_each_update_is_one_line_and_a_gone_root_is_told_once(capsys):
    import re

    from clapcli.cli.index import _IndexProgress, _print_summary
    from clapcli.cli.index_watch import _WatchReport
    from clapcli.index.summary import IndexSummary
    from clapcli.index.watch import WatchUpdate

    report = _WatchReport(False, _print_summary, _IndexProgress, Path("/no/such/index"))
    ran = IndexSummary("/idx", "m", added=2, updated=1, removed=1, seconds=3.14)
    report.update(WatchUpdate(ran))
    report.update(WatchUpdate(IndexSummary("/idx", "m", unchanged=3, seconds=0.2)))  # nothing changed: quiet
    report.update(WatchUpdate(IndexSummary("/idx", ""), missing_roots=["/media/card"]))
    report.update(WatchUpdate(IndexSummary("/idx", ""), missing_roots=["/media/card"]))
    report.update(WatchUpdate(IndexSummary("/idx", "m", seconds=0.1)))
    lines = capsys.readouterr().err.splitlines()
    assert re.fullmatch(r"\d\d:\d\d:\d\d \+2 ~1 -1 \(3\.1 s\)", lines[0]), lines
    assert lines[1].startswith("/media/card is gone") and "stay in the index" in lines[1]
    assert lines[2:] == ["/media/card is back"]


def test_a_file_that_arrives_while_watched_is_tagged_in_the_index_tag_sets(library, tiny_model_dir, tmp_path):
    index_dir = tmp_path / "idx"
    clap("index", library, "--index", index_dir, "--model", tiny_model_dir)
    clap("tag", "--index", index_dir, "--labels", "dog,rain,siren", "--top", "2")
    watcher = Watcher(library, index_dir)
    try:
        watcher.update()  # the first run: nothing new
        write_tone(library / "arrived.wav", 1.5, seed=9)
        added = watcher.update()
        assert added["added"] == 1 and added["tags"], added
        code, stderr = watcher.stop(signal.SIGINT)
    finally:
        watcher.close()
    assert code == 0, stderr
    con = sqlite3.connect(f"file:{index_dir / 'index.sqlite'}?mode=ro", uri=True)
    try:
        labels = [row[0] for row in con.execute(
            "SELECT t.label FROM file_tags t JOIN files f ON f.id = t.file_id WHERE f.path = ? ORDER BY t.rank",
            (str((library / "arrived.wav").resolve()),))]
    finally:
        con.close()
    assert len(labels) == 2 and set(labels) <= {"dog", "rain", "siren"}
