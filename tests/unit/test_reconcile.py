"""Reconcile's rules (pure): what each host holds of a VM against the inventory, as actions.

Properties over every combination of copies (hypothesis): it never releases or discards a copy
that runs, nor the only running one; it never moves the inventory to a host where the VM does
not run; with exactly one running copy the inventory ends on it (or the VM is marked); it never
touches a VM a task holds. Then the cases of issue 22, one by one.
"""

from __future__ import annotations

from uuid import UUID

from hypothesis import given, settings
from hypothesis import strategies as st

from qmotion.api.vm import Nic, VmInfo, VmSpec, VmState
from qmotion.migration.storage import UNSETTLED
from qmotion.server.reconcile import (
    Action,
    Attention,
    Clear,
    Confirm,
    Discard,
    Finish,
    Kind,
    Move,
    Recorded,
    Release,
    Unknown,
    decide,
    kind_of,
)

HOSTS = ("h1", "h2", "h3")
M1, M2 = "a" * 32, "b" * 32
SPEC = VmSpec(name="vm", uuid=UUID(int=1), memory="256M", nics=[Nic(mac="52:54:00:00:00:01")])


def copy(
    host: str,
    qemu: str | None,
    *,
    state: VmState | None = None,
    incoming: str | None = None,
    outgoing: str | None = None,
    status: str | None = None,
    name: str = "vm",
) -> VmInfo:
    """A copy as an agent lists it; ``state`` follows QEMU's status as the agent maps it."""
    if state is None:
        state = {
            "running": VmState.RUNNING,
            None: VmState.STOPPED,
            "shutdown": VmState.STOPPING,
            "guest-panicked": VmState.CRASHED,
        }.get(qemu, VmState.PAUSED)
    return VmInfo(
        name=name,
        uuid=SPEC.uuid,
        host=host,
        state=state,
        qemu_status=qemu,
        spec=SPEC.model_copy(update={"name": name}),
        incoming_migration=incoming,
        outgoing_migration=outgoing,
        outgoing_status=status,
    )


# Every kind of copy an agent can report, with the migration ids that matter.
COPIES = [
    lambda h, m: copy(h, "running"),
    lambda h, m: copy(h, "running", incoming=m),
    lambda h, m: copy(h, "running", outgoing=m, status="completed"),  # arrived, stale status
    lambda h, m: copy(h, "postmigrate", outgoing=m, status="completed"),
    lambda h, m: copy(h, "postmigrate", outgoing=m, status="postcopy-active"),
    lambda h, m: copy(h, "postmigrate"),  # completed before ids existed
    lambda h, m: copy(h, "paused", incoming=m),
    lambda h, m: copy(h, "inmigrate", incoming=m),
    lambda h, m: copy(h, "paused"),
    lambda h, m: copy(h, "io-error"),
    lambda h, m: copy(h, None),
    lambda h, m: copy(h, None, state=VmState.SUSPENDED),
    lambda h, m: copy(h, "shutdown"),
    lambda h, m: copy(h, "guest-panicked"),
]


@st.composite
def worlds(draw: st.DrawFn) -> tuple[Recorded, dict[str, list[VmInfo] | None], bool]:
    recorded = Recorded(
        "vm", draw(st.sampled_from(HOSTS)), draw(st.sampled_from([None, "earlier reason"]))
    )
    census: dict[str, list[VmInfo] | None] = {}
    for h in HOSTS:
        if draw(st.integers(0, 5)) == 0:
            census[h] = None  # did not answer
            continue
        which = draw(st.integers(-4, len(COPIES) - 1))  # negative: no copy there
        m = draw(st.sampled_from([M1, M2]))
        census[h] = [] if which < 0 else [COPIES[which](h, m)]
    return recorded, census, draw(st.booleans())


def running_on(census: dict[str, list[VmInfo] | None]) -> list[str]:
    return [h for h, infos in census.items() for i in infos or () if i.state == VmState.RUNNING]


def held(census: dict[str, list[VmInfo] | None], host: str) -> VmInfo | None:
    return next(iter(census.get(host) or ()), None)


def final_host(row: Recorded, actions: list[Action]) -> str:
    moves = [a for a in actions if isinstance(a, Move)]
    return moves[-1].to if moves else row.host


@settings(max_examples=3000, deadline=None)
@given(worlds())
def test_properties(world: tuple[Recorded, dict[str, list[VmInfo] | None], bool]) -> None:
    row, census, busy = world
    actions = decide([row], census, {"vm"} if busy else set())
    if busy:
        assert actions == []  # a task owns it
        return
    running = running_on(census)
    for a in actions:
        if isinstance(a, Release | Discard):
            # Never the only running copy, nor any running copy; only with one running.
            target = held(census, a.host)
            assert target is not None and target.state != VmState.RUNNING
            assert len(running) == 1 and running[0] != a.host
            mid = target.outgoing_migration if isinstance(a, Release) else target.incoming_migration
            assert a.migration == mid
            if isinstance(a, Release):
                # Only a source that completed its migration (never one in postcopy).
                assert target.qemu_status == "postmigrate"
                assert target.outgoing_status == "completed"
        if isinstance(a, Move):
            # Never to a host where the VM does not run.
            assert a.to in running and a.source == row.host
        if isinstance(a, Finish):
            assert not running
            src, dst = held(census, row.host), held(census, a.host)
            assert src is not None and src.qemu_status == "postmigrate"
            assert src.outgoing_migration == a.migration and src.outgoing_status == "completed"
            assert dst is not None and dst.incoming_migration == a.migration
        if isinstance(a, Confirm):
            target = held(census, a.host)
            assert target is not None and target.state == VmState.RUNNING
            assert target.incoming_migration == a.migration
        if isinstance(a, Clear):
            # Only a full census, the VM running exactly once, where the inventory ends, and
            # no other copy left but the ones this round removes.
            assert row.attention is not None and None not in census.values()
            assert len(running) == 1 and running[0] == final_host(row, actions)
            removed = {x.host for x in actions if isinstance(x, Release | Discard)}
            others = {h for h, infos in census.items() if infos and h != running[0]}
            assert others <= removed
    if not running:
        assert not any(isinstance(a, Clear) for a in actions)  # runs nowhere: the mark stays
    fixes = [a for a in actions if not isinstance(a, Attention | Clear)]
    if len(running) >= 2:
        assert fixes == [] and not any(isinstance(a, Clear) for a in actions)
        assert row.attention is not None or any(isinstance(a, Attention) for a in actions)
    if len(running) == 1:
        marked = row.attention is not None or any(isinstance(a, Attention) for a in actions)
        # The inventory ends on the one running copy, or the VM is marked for an operator.
        assert final_host(row, actions) == running[0] or marked
        theirs = held(census, row.host)
        # Certain (the contract): the recorded host answered and holds no copy, or only a
        # stale one (its guest left by a completed migration). A stopped, suspended or
        # waiting copy there is another definition: an operator decides.
        certain = census.get(row.host) is not None and (
            theirs is None or kind_of(theirs) == Kind.STALE
        )
        if certain:
            assert final_host(row, actions) == running[0]
    marks = [a for a in actions if isinstance(a, Attention | Clear)]
    assert len(marks) <= 1 and actions[len(actions) - len(marks) :] == marks  # the mark last


def test_postmigrate_source_and_running_destination_move_the_inventory_and_release() -> None:
    """Issue 22, finding 2: the task ended FAILED, the inventory names the source (paused in
    postmigrate), the VM runs on the destination."""
    census: dict[str, list[VmInfo] | None] = {
        "h1": [copy("h1", "postmigrate", outgoing=M1, status="completed")],
        "h2": [copy("h2", "running", incoming=M1)],
    }
    row = Recorded("vm", "h1", "switchover unconfirmed: h2 unreachable")
    assert decide([row], census, set()) == [
        Move("vm", "h1", "h2", SPEC),
        Confirm("vm", "h2", M1),
        Release("vm", "h1", M1),
        Clear("vm"),
    ]


def test_two_running_copies_are_marked_never_fixed() -> None:
    census: dict[str, list[VmInfo] | None] = {
        "h1": [copy("h1", "running", outgoing=M1, status="completed")],
        "h2": [copy("h2", "running", incoming=M1)],
        "h3": [],
    }
    (action,) = decide([Recorded("vm", "h1")], census, set())
    assert isinstance(action, Attention)
    assert "runs on h1 and h2" in action.reason


def test_paused_destination_gets_the_word_when_its_source_completed() -> None:
    census: dict[str, list[VmInfo] | None] = {
        "h1": [copy("h1", "postmigrate", outgoing=M1, status="completed")],
        "h2": [copy("h2", "paused", incoming=M1)],
    }
    assert decide([Recorded("vm", "h1")], census, set()) == [Finish("vm", "h2", M1)]
    # Another migration's destination is not this source's twin: nothing is run.
    census["h2"] = [copy("h2", "paused", incoming=M2)]
    (action,) = decide([Recorded("vm", "h1")], census, set())
    assert isinstance(action, Attention) and "postmigrate on h1" in action.reason


def test_postmigrate_with_no_running_twin_is_marked() -> None:
    census: dict[str, list[VmInfo] | None] = {
        "h1": [copy("h1", "postmigrate", outgoing=M1, status="completed")],
        "h2": [],
        "h3": None,
    }
    (action,) = decide([Recorded("vm", "h1")], census, set())
    assert isinstance(action, Attention)
    assert "paused in postmigrate on h1" in action.reason and "h3 did not answer" in action.reason


def test_postcopy_source_is_never_released_nor_left_by_the_inventory() -> None:
    """In postcopy the source holds pages the destination still needs."""
    census: dict[str, list[VmInfo] | None] = {
        "h1": [copy("h1", "postmigrate", outgoing=M1, status="postcopy-active")],
        "h2": [copy("h2", "running", incoming=M1)],
    }
    (action,) = decide([Recorded("vm", "h1")], census, set())
    assert isinstance(action, Attention) and "recorded host h1 holds it" in action.reason


def test_silent_recorded_host_keeps_the_inventory_and_marks() -> None:
    census: dict[str, list[VmInfo] | None] = {"h1": None, "h2": [copy("h2", "running")]}
    (action,) = decide([Recorded("vm", "h1")], census, set())
    assert isinstance(action, Attention) and "h1 does not answer" in action.reason


def test_waiting_leftover_is_discarded_and_mark_cleared_once_all_answer() -> None:
    census: dict[str, list[VmInfo] | None] = {
        "h1": [copy("h1", "running")],
        "h2": [copy("h2", "paused", incoming=M1)],
    }
    row = Recorded("vm", "h1", "old")
    assert decide([row], census, set()) == [Discard("vm", "h2", M1), Clear("vm")]
    census["h3"] = None
    assert decide([row], census, set()) == [Discard("vm", "h2", M1)]  # no full census


def test_same_reason_is_not_written_again_and_unknown_vms_are_only_named() -> None:
    census: dict[str, list[VmInfo] | None] = {
        "h1": [copy("h1", "running"), copy("h1", "running", name="stray")],
        "h2": [copy("h2", "running")],
    }
    first = decide([Recorded("vm", "h1")], census, set())
    assert isinstance(first[0], Attention) and first[1:] == [Unknown("stray", ("h1",))]
    again = decide([Recorded("vm", "h1", first[0].reason)], census, set())
    assert again == [Unknown("stray", ("h1",))]
    assert decide([Recorded("vm", "h1")], census, {"vm", "stray"}) == []


def test_an_unsettled_storage_move_keeps_its_mark_however_well_the_vm_runs() -> None:
    """The agent's record of the move, not the census, is what is unsettled (it refuses to
    migrate the VM): only ``vm resolve`` settles it and clears the mark."""
    census: dict[str, list[VmInfo] | None] = {"h1": [copy("h1", "running")], "h2": []}
    row = Recorded("vm", "h1", f"{UNSETTLED}to shared: the agent did not confirm ...")
    assert decide([row], census, set()) == []
    assert decide([Recorded("vm", "h1", "switchover unconfirmed")], census, set()) == [Clear("vm")]
