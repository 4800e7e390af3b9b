"""The cold-migration machine against in-memory agents that answer as the real ones do:
whatever fails and whenever a cancel comes, the VM is defined on exactly one host (the one the
inventory names) and that host has its disks."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from qmotion.api.vm import Disk
from qmotion.migration import cold
from qmotion.migration.cold import ColdPortError, CPhase


@dataclass
class FakeCluster:
    """``faults``: call number -> "before" (failed, nothing happened) or "after" (happened,
    answer lost). The destination's define of the same VM again is answered as done, as the
    real port does (same UUID)."""

    faults: dict[int, str] = field(default_factory=dict)
    calls: int = 0
    defined: set[str] = field(default_factory=lambda: {"src"})
    inventory: str = "src"
    files: dict[str, set[str]] = field(default_factory=lambda: {"src": {"d0"}, "dst": set()})
    exported: bool = False
    held: bool = False
    made: list[str] = field(default_factory=list)

    def _call(self, effect: object, then: object = None) -> object:
        """``then``: what the port does itself once the agent answered (the real define
        commits the inventory only after the destination's answer: a lost answer, no commit)."""
        self.calls += 1
        fault = self.faults.get(self.calls)
        if fault == "before":
            raise ColdPortError(f"call {self.calls} failed")
        result = effect() if callable(effect) else None
        if fault == "after":
            raise ColdPortError(f"call {self.calls}: answer lost")
        if callable(then):
            then()
        return result

    async def export(self, copying: bool) -> None:
        def do() -> None:
            self.held = True
            self.exported = copying

        self._call(do)

    async def copy(self) -> tuple[Disk, ...]:
        def do() -> tuple[Disk, ...]:
            if not self.exported:
                raise ColdPortError("no export", refused=True)
            if "d0" in self.files["dst"]:
                raise ColdPortError("exists", refused=True)
            self.files["dst"].add("d0")
            self.made.append("d0")
            self.exported = False
            return (Disk(datastore="b", path="d0"),)

        got = self._call(do)
        assert isinstance(got, tuple)
        return got

    async def define(self, disks: tuple[Disk, ...]) -> None:
        if self.inventory == "dst":  # as the real port: the inventory says it is done
            return

        def do() -> None:
            self.defined.add("dst")  # idempotent: the same VM again is "done"

        def commit() -> None:
            self.inventory = "dst"

        self._call(do, commit)

    async def cleanup(self, copied: bool) -> tuple[str, ...]:
        def do() -> tuple[str, ...]:
            self.defined.discard("src")
            self.exported = self.held = False
            if copied:
                self.files["src"].discard("d0")
            return ()

        got = self._call(do)
        assert isinstance(got, tuple)
        return got

    async def abort(self) -> None:
        # As the real port: refused when the inventory has the VM on the destination (the
        # machine then goes forward); else the source released, a destination definition the
        # inventory never took removed (without its disks), then the copies.
        if self.inventory == "dst":
            raise ColdPortError("moved already", moved=True)

        def do() -> None:
            self.exported = self.held = False
            self.defined.discard("dst")
            for f in self.made:
                self.files["dst"].discard(f)
            self.made.clear()

        self._call(do)


def run(c: FakeCluster, copying: bool = True, cancel_at: int | None = None) -> cold.ColdState:
    cancel = asyncio.Event()
    steps = 0

    async def persist(st: cold.CStep) -> None:
        nonlocal steps
        steps += 1
        assert steps < 1000, "the machine does not end"
        if cancel_at is not None and c.calls >= cancel_at:
            cancel.set()

    return asyncio.run(cold.run(c, persist, cancel, cold.first(copying), retry_s=0))


def assert_one_home(c: FakeCluster, final: cold.ColdState, copying: bool = True) -> None:
    assert final.phase.final
    home = c.inventory
    # Never defined on two hosts, warned or not: the rollback removes a definition the
    # inventory never took, the cleanup the old one.
    assert c.defined == {home} or (final.warnings and final.phase == CPhase.FAILED), c.defined
    if not final.warnings:
        assert c.defined == {home}, ("defined on two hosts, unwarned", c.defined)
    assert home in c.defined, (home, c.defined)
    assert "d0" in c.files[home] or not copying, c.files
    if final.phase == CPhase.DONE:
        assert home == "dst"
        if not final.warnings:
            assert c.defined == {"dst"} and c.files["src"] == (set() if copying else {"d0"})
    elif home == "src" and not final.warnings:
        assert c.defined == {"src"} and c.files["dst"] == set()
        assert not c.exported and not c.held, "the source still holds or exports the VM"


def test_a_stopped_vm_moves_with_its_disk() -> None:
    c = FakeCluster()
    final = run(c)
    assert final.phase == CPhase.DONE and c.inventory == "dst" and c.defined == {"dst"}
    assert c.files == {"src": set(), "dst": {"d0"}}


def test_only_the_definition_moves_when_nothing_is_copied() -> None:
    c = FakeCluster()
    final = run(c, copying=False)
    assert final.phase == CPhase.DONE and c.defined == {"dst"} and c.files["src"] == {"d0"}


def test_a_cancel_during_the_copy_keeps_the_vm_on_its_source() -> None:
    c = FakeCluster()
    final = run(c, cancel_at=1)
    assert final.phase == CPhase.CANCELLED
    assert c.defined == {"src"} and c.files == {"src": {"d0"}, "dst": set()}


def test_every_single_failure_leaves_one_home_and_nothing_behind() -> None:
    probe = FakeCluster()
    run(probe)
    for kind in ("before", "after"):
        for k in range(1, probe.calls + 1):
            c = FakeCluster(faults={k: kind})
            final = run(c)
            assert_one_home(c, final)
            # One failure is always recovered cleanly: no half-done state to warn about.
            assert not final.warnings, (kind, k, final)
            if kind == "after" and k >= 3:  # the destination had the VM: forward
                assert final.phase == CPhase.DONE, (kind, k, final)


def test_a_cancel_at_any_point_ends_cancelled_on_the_source_or_done_on_the_destination() -> None:
    probe = FakeCluster()
    run(probe)
    for k in range(probe.calls + 1):
        c = FakeCluster()
        final = run(c, cancel_at=k)
        assert_one_home(c, final)
        assert not final.warnings, (k, final)
        assert (final.phase, c.inventory) in ((CPhase.CANCELLED, "src"), (CPhase.DONE, "dst"))
        if k >= 3:  # asked after the destination defined the VM: too late, it goes on
            assert final.phase == CPhase.DONE, (k, final)


@settings(max_examples=300, deadline=None)
@given(
    faults=st.dictionaries(
        st.integers(min_value=1, max_value=25), st.sampled_from(["before", "after"]), max_size=6
    ),
    cancel_at=st.none() | st.integers(min_value=0, max_value=12),
    copying=st.booleans(),
)
def test_property_faults_and_cancels_leave_exactly_one_home(
    faults: dict[int, str], cancel_at: int | None, copying: bool
) -> None:
    c = FakeCluster(faults=faults)
    assert_one_home(c, run(c, copying=copying, cancel_at=cancel_at), copying)


def test_a_restart_after_the_inventory_moved_goes_forward_even_if_the_destination_is_down() -> None:
    """Defined and committed, then the manager restarted before recording it: the repeated
    define is done by the inventory's word; a rollback would be refused as "moved"."""
    c = FakeCluster(defined={"src", "dst"}, inventory="dst")
    c.files["dst"].add("d0")
    c.faults = {n: "before" for n in range(1, 4)}  # the destination does not answer at first
    st_ = cold.step(cold.ColdState(CPhase.DEFINE, True), cold.Restarted())
    final = asyncio.run(cold.run(c, _no_persist, asyncio.Event(), st_, retry_s=0))
    assert final.phase == CPhase.DONE and c.defined == {"dst"} and c.files["src"] == set()
    rollback = cold.ColdState(CPhase.ROLLBACK, True)
    c2 = FakeCluster(defined={"src", "dst"}, inventory="dst")
    c2.files["dst"].add("d0")
    final = asyncio.run(
        cold.run(c2, _no_persist, asyncio.Event(), cold.CStep(rollback, cold.CAction.ABORT), 0)
    )
    assert final.phase == CPhase.DONE and c2.defined == {"dst"}, final


async def _no_persist(st: cold.CStep) -> None:
    return None


def test_a_restarted_manager_rolls_back_a_copy_and_finishes_a_definition() -> None:
    for phase, expect in ((CPhase.COPY, cold.CAction.ABORT), (CPhase.DEFINE, cold.CAction.DEFINE)):
        st_ = cold.step(cold.ColdState(phase, True), cold.Restarted())
        assert st_.action == expect
    s = cold.ColdState(CPhase.CLEANUP, True, disks=(Disk(datastore="b", path="d0"),))
    assert cold.state_from_json(cold.state_to_json(s)) == s


def test_a_same_named_datastore_that_is_not_shared_is_refused_without_a_copy() -> None:
    """Two hosts' local datastores of the same name are different storage: moving only the
    definition would leave the VM without its disk there."""
    from qmotion.server.tasks.cold import cold_refusals

    args = (frozenset({"data"}), frozenset({"data"}), "h2")
    refused = cold_refusals([], None, *args, not_shared=frozenset({"data"}))
    assert [r.code for r in refused] == ["datastore_not_shared"]
    assert "--datastore" in refused[0].message
    assert cold_refusals([], None, *args) == []  # shared on both: the definition moves
    copied = cold_refusals([], "other", frozenset({"data"}), frozenset({"other"}), "h2")
    assert copied == []  # copied to a datastore the destination reaches
