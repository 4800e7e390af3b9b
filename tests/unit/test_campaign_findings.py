"""What the fault campaign found (tests.unit.campaign), each counterexample shrunk by it and
replayed here as a deterministic test over the real manager and the scripted agents.

1. A storage move whose agent is away for a few seconds when the old files are to go: the
   manager tried the release five times within milliseconds and gave up, so the old files
   stayed (named nowhere) and the agent's move record stayed ``pivoted``, which makes the
   agent refuse every later live migration of the VM, for good. Fixed: a failed call of a
   storage move is tried again after a doubling wait (``migration.storage.run``).
2. When the agent does not answer the release (or a rollback's abort) for longer than the
   manager tries, the files it was to remove are named as the task's leftovers: nothing is
   left that no record names.
3. A storage move whose agent restarts right after the pivot and stays away longer than the
   manager tries: the inventory kept naming the old disks (a later live migration hands the
   inventory's definition to its destination). Fixed: reconcile makes the inventory name the
   disks the running copy's definition names (``reconcile``: a ``Move`` to the same host).
4. The source agent restarts just as ``migrate`` is issued (the stream flows, the answer is
   lost): the rollback could not reach it and the task ended FAILED at once, with QEMU still
   migrating. Reconcile then saw the source running and the paused destination, and deleted
   the destination, but QEMU completed the stream between its census and the delete: the VM
   ran nowhere (the source in postmigrate, its state in the deleted destination). Fixed twice:
   a rollback the source did not confirm is asked again with a backoff (``machine``,
   ``ROLLBACK_RETRIES``), and reconcile never discards a destination the running copy still
   streams to (``reconcile``).
5. (A review, then the campaign's end-of-run liveness check.) Findings 1 and 2 still left
   the agent's record of the move open when the manager gave up: the agent then refuses to
   migrate the VM for good, and nothing marked it. Fixed: the VM is marked
   (``storage.UNSETTLED``), reconcile keeps that mark, and ``vm resolve`` settles the move on
   the agent; the files named survive a manager restart (persisted in the move's state).
"""

from __future__ import annotations

from uuid import UUID

from qmotion.api.server import TaskState
from qmotion.api.vm import Nic, VmInfo, VmSpec, VmState
from qmotion.migration.storage import UNSETTLED
from qmotion.server.reconcile import Attention, Discard, Recorded, decide
from tests.unit.campaign.driver import run
from tests.unit.campaign.schedule import Op, Placed, Schedule
from tests.unit.campaign.world import Fault, Injected

RELEASE = ("h1", "POST", "/v1/vms/vm1/storage-move/release", 1)
ABORT = ("h1", "POST", "/v1/vms/vm1/storage-move/abort", 1)


def test_a_storage_move_waits_for_its_agent_to_release_the_old_files() -> None:
    """Shrunk from seed 2: the agent unreachable for 3 s from the release on."""
    schedule = Schedule(
        seed=0,
        placed=[Placed("vm1", "h1", "local-h1")],
        ops=[
            Op("storage", vm="vm1", datastore="shared", gap_s=10.0),
            Op("migrate", vm="vm1", to="h2"),  # the agent lets it go only once released
        ],
        faults={RELEASE: Injected(Fault.UNREACHABLE, seconds=3.0)},
    )
    out = run(schedule)
    assert out.violations == []
    assert out.world is not None
    assert out.settled["vm1"] == ["h2"]
    assert "local-h1:vm1/disk0.qcow2" not in out.world.files["h1"]  # the old file went
    moved, migrated = out.tasks
    assert moved.state == TaskState.SUCCEEDED and migrated.state == TaskState.SUCCEEDED


def test_old_files_the_agent_never_released_are_named() -> None:
    schedule = Schedule(
        seed=0,
        placed=[Placed("vm1", "h1", "local-h1")],
        ops=[Op("storage", vm="vm1", datastore="shared")],
        faults={RELEASE: Injected(Fault.UNREACHABLE, seconds=600.0)},
    )
    out = run(schedule)
    assert out.violations == []  # nothing left that no record names
    (moved,) = out.tasks
    assert moved.state == TaskState.SUCCEEDED
    assert any(e.message == "left behind: local-h1:vm1/disk0.qcow2" for e in moved.events)
    # The agent's record of the move stays pivoted (it refuses to migrate the VM): the VM is
    # marked, reconcile leaves the mark, and the operator's resolve settles it (the run's
    # end then moves the VM once more: it must succeed).
    assert out.marked["vm1"].startswith(UNSETTLED), out.marked


def test_files_named_before_a_manager_restart_are_named_after_it() -> None:
    """The manager dies as it asks for the release; restarted, it never hears from the agent
    again: the files it learnt of before it died are still named, and the VM marked."""
    release_again = (*RELEASE[:3], 2)
    schedule = Schedule(
        seed=0,
        placed=[Placed("vm1", "h1", "local-h1")],
        ops=[Op("storage", vm="vm1", datastore="shared")],
        faults={
            RELEASE: Injected(Fault.MANAGER_RESTART),
            release_again: Injected(Fault.UNREACHABLE, seconds=900.0),
        },
    )
    out = run(schedule)
    assert out.violations == []
    assert out.schedule.faults.keys() == schedule.faults.keys()  # both struck
    (moved,) = out.tasks
    assert any(e.message == "left behind: local-h1:vm1/disk0.qcow2" for e in moved.events)
    assert out.marked["vm1"].startswith(UNSETTLED), out.marked


def test_new_files_a_rollback_could_not_remove_are_named() -> None:
    """The agent is away while the mirror runs (the move rolls back) and stays away."""
    poll = ("h1", "GET", "/v1/vms/vm1/storage-move", 1)
    schedule = Schedule(
        seed=0,
        placed=[Placed("vm1", "h1", "shared")],
        ops=[Op("storage", vm="vm1", datastore="local-h1")],
        faults={poll: Injected(Fault.UNREACHABLE, seconds=900.0)},
    )
    out = run(schedule)
    assert out.violations == []
    (moved,) = out.tasks
    assert moved.state == TaskState.FAILED
    assert any(e.message.startswith("left behind: local-h1:vm1/") for e in moved.events)
    assert out.marked["vm1"].startswith(UNSETTLED), out.marked
    assert out.settled["vm1"] == ["h1"]


def test_a_move_whose_start_answer_was_lost_is_marked_and_settled_by_resolve() -> None:
    """From seed 48 of the long run: the agent made the new files, then restarted before it
    answered, and stayed away past the rollback's tries. The manager never learnt the files'
    names; the agent's record has them: the VM is marked, the operator's resolve aborts the
    move there (the new files go), and the VM moves again."""
    start = ("h1", "POST", "/v1/vms/vm1/storage-move", 1)
    schedule = Schedule(
        seed=0,
        placed=[Placed("vm1", "h1", "shared")],
        ops=[Op("storage", vm="vm1", datastore="local-h1")],
        faults={start: Injected(Fault.AGENT_RESTART, done=True, seconds=600.0)},
    )
    out = run(schedule)
    assert out.violations == []  # among them, after resolve: no file left that none names
    (moved,) = out.tasks
    assert moved.state == TaskState.FAILED
    assert out.marked["vm1"].startswith(UNSETTLED), out.marked
    assert out.world is not None
    assert not any(f.startswith("local-h1:vm1/") for f in out.world.files["h1"])


def test_reconcile_names_the_disks_a_storage_move_left_the_vm_on() -> None:
    """Shrunk from seed 26: the agent restarts as the inventory is about to read the new
    definition, and stays away 120 s (longer than the task tries to release the old files)."""
    adopt = ("h1", "GET", "/v1/vms/vm1", 1)
    schedule = Schedule(
        seed=0,
        placed=[Placed("vm1", "h1", "shared")],
        ops=[Op("storage", vm="vm1", datastore="local-h1")],
        faults={adopt: Injected(Fault.AGENT_RESTART, done=True, seconds=120.0)},
    )
    out = run(schedule)
    assert out.violations == []  # among them: the inventory names the disks QEMU runs on
    (moved,) = out.tasks
    assert moved.state == TaskState.SUCCEEDED
    assert any(e.message == "left behind: shared:vm1/disk0.qcow2" for e in moved.events)


def test_a_rollback_waits_for_the_source_agent_to_come_back() -> None:
    """Shrunk from seed 28: the source agent restarts as migrate is issued (down 5 s), and
    QEMU completes the stream 15 s later, during the first reconcile round."""
    migrate = ("h2", "POST", "/v1/vms/vm2/migration", 1)
    schedule = Schedule(
        seed=0,
        placed=[Placed("vm2", "h2", "shared")],
        ops=[Op("migrate", vm="vm2", to="h1", gap_s=20.0)],
        faults={
            migrate: Injected(Fault.AGENT_RESTART, done=True, seconds=5.0),
            ("h3", "GET", "/v1/vms", 1): Injected(Fault.COMPLETE, vm="vm2"),
        },
    )
    out = run(schedule)
    assert out.violations == []
    (task,) = out.tasks
    # The rollback was confirmed: cancelled on the source, which runs, the destination gone.
    assert task.state == TaskState.FAILED and task.result is not None
    assert task.result.leftovers == []
    assert out.settled["vm2"] == ["h2"]
    assert out.defined["vm2"] == ["h2"]


def _copy(host: str, qemu: str, **ids: str | None) -> VmInfo:
    spec = VmSpec(name="vm", uuid=UUID(int=1), memory="256M", nics=[Nic(mac="52:54:00:00:00:01")])
    state = VmState.RUNNING if qemu == "running" else VmState.PAUSED
    return VmInfo(
        name="vm", uuid=spec.uuid, host=host, state=state, qemu_status=qemu, spec=spec, **ids
    )


def test_reconcile_never_discards_a_destination_its_source_still_streams_to() -> None:
    """No task follows the stream (its rollback gave up): QEMU may complete it between the
    census and a discard, and that destination then holds the newest memory."""
    m = "a" * 32
    for status, discarded in (("active", False), ("device", False), ("failed", True)):
        census = {
            "h2": [_copy("h2", "running", outgoing_migration=m, outgoing_status=status)],
            "h1": [_copy("h1", "inmigrate", incoming_migration=m)],
        }
        actions = decide([Recorded("vm", "h2")], census, set())
        assert (Discard("vm", "h1", m) in actions) == discarded, (status, actions)
        if not discarded:
            assert [type(a) for a in actions] == [Attention], actions
