"""State files on a real full disk: a small tmpfs, filled by a filler file.

Every state file a collector keeps (names.json, the energy integrator, the
Kasa smart energy totals, the Glow registers, the MQTT device ids, the lock)
is tried on a full disk: one log line, no exception, the data kept in
memory, and written once space is back.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from harness.disk import fill_until_full
from kasa_energy import SmartEnergyTotals
from mqtt_glow import RegisterGuard
from spool import Spool
from state import EnergyIntegrator, NameMap, StateLock, atomic_write_json, prepare_state_dir

# Every test here mounts a real tmpfs (a process).
pytestmark = pytest.mark.slow


class FullDisk:
    """A mounted tmpfs of ``size`` bytes and ``inodes`` inodes that ``fill``
    fills (blocks and inodes) and ``free`` empties again."""

    def __init__(self, mount_point: Path) -> None:
        self.mount_point = mount_point
        self.filler = mount_point / "filler"
        self.inode_fillers: list[Path] = []

    def fill(self, inodes: bool = True) -> None:
        fill_until_full(self.filler, first_chunk_bytes=1 << 16)
        for number in range(1000 if inodes else 0):  # the inodes too: small files
            path = self.mount_point / f"inode-{number}"
            try:
                path.touch()
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
            self.inode_fillers.append(path)

    def free(self) -> None:
        self.filler.unlink()
        for path in self.inode_fillers:
            path.unlink()
        self.inode_fillers = []


@pytest.fixture
def disk(tmp_path):
    """A 256 KiB tmpfs with 64 inodes under tmp_path, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    if not shutil.which("mount"):
        pytest.skip("no mount command")
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,nr_inodes=64", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield FullDisk(mount_point)
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def errors_about(caplog, path: Path) -> list[str]:
    return [r.getMessage() for r in caplog.records if str(path) in r.getMessage()]


def test_a_refused_write_leaves_the_old_file_and_no_temporary(disk):
    path = disk.mount_point / "state.json"
    atomic_write_json(path, {"old": 1})
    disk.fill(inodes=False)  # the temporary file can be made, not written
    with pytest.raises(OSError, match="No space left"):
        atomic_write_json(path, {"new": "x" * 100_000})
    assert json.loads(path.read_text()) == {"old": 1}
    assert not path.with_name("state.json.tmp").exists()  # not left to fill the disk more


def test_names_are_said_once_kept_and_written_when_space_is_back(disk, caplog):
    path = disk.mount_point / "names.json"
    names = NameMap(path)
    names.name_for("id-1", "Kettle")
    disk.fill()
    with caplog.at_level(logging.INFO):
        for number in range(2, 6):  # new devices each want names.json written
            names.name_for(f"id-{number}", f"Plug {number}")
    assert len([m for m in errors_about(caplog, path) if "No space left" in m]) == 1
    assert names.name_for("id-5") == "plug_5"  # kept in memory meanwhile
    disk.free()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        names.name_for("id-6", "Fridge")
    assert any("again" in m for m in errors_about(caplog, path))
    assert set(json.loads(path.read_text())) == {f"id-{n}" for n in range(1, 7)}


def test_energy_integrator_keeps_counting_on_a_full_disk(disk, caplog):
    path = disk.mount_point / "energy.json"
    energy = EnergyIntegrator(path, max_gap_s=60)
    energy.add("plug", 0.0, 1000.0)
    energy.save()
    disk.fill()
    with caplog.at_level(logging.INFO):
        for second in range(1, 11):  # one save per cycle, as tuya_to_graphite does
            energy.add("plug", float(second * 10), 1000.0)
            energy.save()
    assert len(errors_about(caplog, path)) == 1
    disk.free()
    energy.save()
    stored = json.loads(path.read_text())
    assert stored["plug"]["energy_kwh"] == pytest.approx(100 / 3600)


def test_kasa_smart_energy_totals_survive_a_full_disk(disk, caplog):
    path = disk.mount_point / "smart_energy.json"
    totals = SmartEnergyTotals(path)
    totals.total_kwh("plug", "2026-12-02", 1.0, 5.0)
    totals.save(force=True)
    disk.fill()
    with caplog.at_level(logging.INFO):
        for today in (1.5, 2.0, 2.5):
            totals.total_kwh("plug", "2026-12-02", today, 5.0)
            totals.save(force=True)
    assert len(errors_about(caplog, path)) == 1
    disk.free()
    totals.save(force=True)
    assert json.loads(path.read_text())["plug"]["today_kwh"] == 2.5


def test_glow_registers_stay_dirty_until_written(disk, caplog):
    path = disk.mount_point / "glow_registers.json"
    guard = RegisterGuard(path)
    guard.check("electricity.import_kwh", 100.0)
    guard.save()
    disk.fill()
    with caplog.at_level(logging.INFO):
        guard.check("electricity.import_kwh", 101.0)
        guard.save()
        guard.save()
    assert len(errors_about(caplog, path)) == 1
    disk.free()
    guard.save()  # nothing new came, but the last value never reached the disk
    assert json.loads(path.read_text())["electricity.import_kwh"] == 101.0


def test_the_lock_holds_on_a_full_disk(disk):
    # Left by an earlier start (never removed), empty: the pid needs a block.
    (disk.mount_point / "lock").touch()
    disk.fill()
    first, second = StateLock(disk.mount_point / "lock"), StateLock(disk.mount_point / "lock")
    with contextlib.ExitStack() as stack:
        stack.callback(first.release)
        stack.callback(second.release)
        assert first.acquire()  # not an OSError: the collector starts
        assert not second.acquire()


def test_a_full_state_disk_is_no_setting_error_at_start(disk, caplog):
    state_dir = disk.mount_point / "kasa"
    state_dir.mkdir()
    disk.fill()
    with caplog.at_level(logging.INFO):
        prepare_state_dir(state_dir)  # ConfigError (exit 2, restarted every 10 s) before
    assert any("disk is full" in r.getMessage() for r in caplog.records)


def test_the_spool_takes_no_short_write_for_a_whole_one(disk):
    """A full disk takes the part of a write that fits its last page and
    refuses only the next write: the part must not count as written."""
    directory = disk.mount_point / "spool"
    spool = Spool(directory)
    first = [f"home.test.a {n} {1_700_000_000 + n}\n" for n in range(10)]
    assert spool.append(first)
    disk.fill(inodes=False)  # the segment's page still has room for ~4 KB
    batch = [f"home.test.b {n} {1_700_000_000 + n}\n" for n in range(1000)]  # ~30 KB
    assert not spool.append(batch)  # refused: the lines wait in memory
    on_disk = b"".join(p.read_bytes() for p in sorted(directory.glob("*.spool")))
    assert on_disk.decode() == "".join(first)  # no torn line, nothing half-counted
    disk.free()
    assert spool.append(["home.test.c 1 1700000001\n"])  # memory first, then these
    on_disk = b"".join(p.read_bytes() for p in sorted(directory.glob("*.spool")))
    assert on_disk.decode() == "".join(first + batch) + "home.test.c 1 1700000001\n"
    spool.close()


def test_lines_confirmed_from_memory_are_in_the_resend_window(disk):
    """While the disk is full the sender delivers from memory; carbon-cache
    dying right after must not take those lines (found by bench_soak: one
    boundary lost when carbon-cache was killed during a full disk)."""
    directory = disk.mount_point / "spool"
    spool = Spool(directory)
    assert spool.append([f"home.test.a 0 {1_700_000_000}\n"])
    disk.fill(inodes=False)
    waiting = [f"home.test.b {n} {1_700_000_000 + n}\n" for n in range(1000)]
    assert not spool.append(waiting)  # in memory
    batch = spool.next_batch(5000, newest_first=True)
    assert batch is not None
    assert batch.lines == waiting
    spool.confirm(batch, keep_s=120, keep_max_lines=100_000)  # Carbon confirmed them
    assert spool.rewind(120) >= 1000  # carbon-cache died: the window goes again
    again = spool.next_batch(5000, newest_first=True)
    assert again is not None
    assert again.lines == waiting
    disk.free()
    spool.close()
