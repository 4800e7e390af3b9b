"""The storage-move machine against an in-memory agent that behaves as the real one does
(qmotion.agent.disks.storage): whatever fails, and whenever a cancel comes, the VM runs on exactly
one complete set of disks, new files are gone unless the disks switched, old files are gone
only if they did."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmotion.api.storage import DiskMirror, MirrorStatus
from qmotion.api.vm import Disk
from qmotion.migration import storage
from qmotion.migration.storage import UNSETTLED, SPhase, StoragePortError

GiB = 1 << 30


@dataclass
class FakeAgent:
    """Two disks, copied at ``copy_rate`` while the guest dirties ``write_rate`` (bytes/s of
    simulated time; every status call is half a second). Write-blocking mode stops new dirt
    from accumulating, as QEMU's active mirror does. ``faults``: call number -> "before" (the
    call fails, nothing happened) or "after" (it happened, the answer is lost)."""

    copy_rate: float = 400e6
    write_rate: float = 0.0
    faults: dict[int, str] = field(default_factory=dict)
    job_fails_at_poll: int | None = None
    calls: int = 0
    polls: int = 0
    phase: str = "none"  # none, mirroring, failed, pivoted, released, aborted
    copied: list[float] = field(default_factory=lambda: [0.0, 0.0])
    sizes: tuple[int, int] = (2 * GiB, GiB)
    write_blocking: bool = False
    files: set[str] = field(default_factory=lambda: {"old0", "old1"})
    in_use: tuple[str, str] = ("old0", "old1")
    clock: float = 0.0

    def _call(self, effect: object) -> MirrorStatus:
        self.calls += 1
        fault = self.faults.get(self.calls)
        if fault == "before":
            raise StoragePortError(f"call {self.calls} failed")
        result = effect() if callable(effect) else None
        if fault == "after":
            raise StoragePortError(f"call {self.calls}: answer lost")
        assert isinstance(result, MirrorStatus)
        return result

    def _status(self) -> MirrorStatus:
        disks = [
            DiskMirror(
                index=i,
                job=f"j{i}",
                source=Disk(datastore="a", path=f"old{i}"),
                target=Disk(datastore="b", path=f"new{i}"),
                status="ready" if self.copied[i] >= self.sizes[i] else "running",
                offset=int(self.copied[i]),
                length=self.sizes[i],
                ready=self.copied[i] >= self.sizes[i],
            )
            for i in range(2)
        ]
        phase = self.phase
        if phase == "mirroring" and all(d.ready for d in disks):
            phase = "ready"
        total = sum(self.sizes)
        return MirrorStatus(
            vm="vm1",
            phase=phase,
            datastore="b",
            copy_mode="write-blocking" if self.write_blocking else "background",
            disks=disks if phase not in ("aborted", "none") else [],
            total_bytes=total,
            remaining_bytes=int(total - sum(self.copied)),
            error="No space left on device" if phase == "failed" else None,
        )

    # -- the agent's calls

    async def start(self) -> MirrorStatus:
        def do() -> MirrorStatus:
            if self.phase not in ("none", "aborted"):
                raise StoragePortError("already moving", refused=True)
            self.files |= {"new0", "new1"}
            self.phase = "mirroring"
            return self._status()

        return self._call(do)

    async def status(self) -> MirrorStatus:
        def do() -> MirrorStatus:
            if self.phase == "none":
                raise StoragePortError("no storage move", refused=True)
            if self.phase == "mirroring":
                self.polls += 1
                self.clock += 0.5
                if self.polls == self.job_fails_at_poll:
                    self.phase = "failed"
                for i in range(2):
                    gain = self.copy_rate / 2 * 0.5
                    dirt = 0.0 if self.write_blocking else self.write_rate / 2 * 0.5
                    self.copied[i] = min(self.sizes[i], max(0.0, self.copied[i] + gain - dirt))
            return self._status()

        return self._call(do)

    async def activate(self) -> MirrorStatus:
        def do() -> MirrorStatus:
            if self.phase != "mirroring":
                raise StoragePortError(f"the move is {self.phase}", refused=True)
            self.write_blocking = True
            return self._status()

        return self._call(do)

    async def pivot(self) -> MirrorStatus:
        def do() -> MirrorStatus:
            if self.phase != "mirroring" or not all(
                c >= s for c, s in zip(self.copied, self.sizes, strict=True)
            ):
                raise StoragePortError("not in sync; nothing switched", refused=True)
            self.in_use = ("new0", "new1")
            self.phase = "pivoted"
            return self._status()

        return self._call(do)

    async def release(self) -> MirrorStatus:
        def do() -> MirrorStatus:
            if self.phase == "released":  # as the real agent: no record left, answered again
                return self._status()
            if self.phase not in ("pivoted",):
                raise StoragePortError(f"the move is {self.phase}", refused=True)
            self.files -= {"old0", "old1"}
            self.phase = "released"
            return self._status()

        return self._call(do)

    async def abort(self) -> MirrorStatus:
        def do() -> MirrorStatus:
            if self.phase in ("pivoted", "released"):
                raise StoragePortError("already switched", refused=True, switched=True)
            self.files -= {"new0", "new1"} - set(self.in_use)
            self.phase = "aborted"
            return self._status()

        return self._call(do)


def run(agent: FakeAgent, cancel_at_call: int | None = None) -> storage.StorageState:
    cancel = asyncio.Event()
    steps: list[storage.Step] = []

    async def persist(st: storage.Step, status: MirrorStatus | None) -> None:
        steps.append(st)
        if cancel_at_call is not None and agent.calls >= cancel_at_call:
            cancel.set()
        assert len(steps) < 5000, "the machine does not end"

    return asyncio.run(storage.run(agent, persist, cancel, clock=lambda: agent.clock, poll_s=0))


def assert_one_good_copy(agent: FakeAgent, final: storage.StorageState) -> None:
    assert set(agent.in_use) <= agent.files, "the VM's disks must exist"
    switched = agent.in_use == ("new0", "new1")
    if final.phase == SPhase.DONE:
        assert switched
        if not final.warnings:
            assert agent.files == {"new0", "new1"}, agent.files
    else:
        assert not switched or final.phase == SPhase.FAILED, final
        if not switched and not final.warnings:
            assert agent.files == {"old0", "old1"}, ("targets left behind", agent.files)
        if switched:
            assert {"new0", "new1"} <= agent.files
    # A move the agent still holds open (it refuses to migrate the VM while it does) is
    # never left unmarked: the VM needs an operator's ``vm resolve``.
    if agent.phase not in ("none", "released", "aborted"):
        assert final.attention is not None and final.attention.startswith(UNSETTLED), (
            agent.phase,
            final,
        )


def test_an_idle_guest_moves_and_the_old_files_go() -> None:
    agent = FakeAgent()
    final = run(agent)
    assert final.phase == SPhase.DONE
    assert agent.in_use == ("new0", "new1") and agent.files == {"new0", "new1"}


def test_a_guest_writing_faster_than_the_copy_still_converges_in_write_blocking_mode() -> None:
    agent = FakeAgent(copy_rate=100e6, write_rate=150e6)
    final = run(agent)
    assert final.phase == SPhase.DONE and final.active
    assert agent.write_blocking


def test_a_job_that_fails_rolls_back_and_removes_the_new_files() -> None:
    agent = FakeAgent(copy_rate=100e6, job_fails_at_poll=3)
    final = run(agent)
    assert final.phase == SPhase.FAILED and "space" in (final.error or "")
    assert agent.in_use == ("old0", "old1") and agent.files == {"old0", "old1"}


def test_cancel_during_the_mirror_leaves_the_vm_on_its_old_disks() -> None:
    agent = FakeAgent(copy_rate=100e6)
    final = run(agent, cancel_at_call=3)
    assert final.phase == SPhase.CANCELLED
    assert agent.in_use == ("old0", "old1") and agent.files == {"old0", "old1"}


def test_a_lost_pivot_answer_is_resolved_by_the_agents_status() -> None:
    agent = FakeAgent()
    # Calls: start, status x k ..., activate, status..., pivot. Find the pivot's number.
    probe = FakeAgent()
    run(probe)
    pivot_call = probe.calls - 1  # the last call is release
    agent.faults = {pivot_call: "after"}
    final = run(agent)
    assert final.phase == SPhase.DONE and agent.files == {"new0", "new1"}


@pytest.mark.parametrize("kind", ["before", "after"])
def test_every_single_failure_keeps_one_good_copy(kind: str) -> None:
    probe = FakeAgent(copy_rate=200e6, write_rate=50e6)
    run(probe)
    for k in range(1, probe.calls + 1):
        agent = FakeAgent(copy_rate=200e6, write_rate=50e6, faults={k: kind})
        final = run(agent)
        assert_one_good_copy(agent, final)


@settings(max_examples=300, deadline=None)
@given(
    faults=st.dictionaries(
        st.integers(min_value=1, max_value=40), st.sampled_from(["before", "after"]), max_size=6
    ),
    cancel_at=st.none() | st.integers(min_value=1, max_value=40),
    job_fails=st.none() | st.integers(min_value=1, max_value=20),
    write_rate=st.sampled_from([0.0, 50e6, 300e6]),
)
def test_property_faults_and_cancels_never_lose_the_disks(
    faults: dict[int, str], cancel_at: int | None, job_fails: int | None, write_rate: float
) -> None:
    agent = FakeAgent(
        copy_rate=200e6, write_rate=write_rate, faults=faults, job_fails_at_poll=job_fails
    )
    final = run(agent, cancel_at_call=cancel_at)
    assert final.phase.final
    assert_one_good_copy(agent, final)


def _agent_in(state: str) -> FakeAgent:
    """The agent as a restarted manager may find it."""
    agent = FakeAgent()
    if state == "none":
        return agent
    agent.files |= {"new0", "new1"}
    agent.phase = "mirroring" if state in ("copying", "synced") else state
    if state == "synced":
        agent.copied = [float(x) for x in agent.sizes]
        agent.write_blocking = True
    if state in ("pivoted", "released"):
        agent.copied = [float(x) for x in agent.sizes]
        agent.in_use = ("new0", "new1")
    if state == "released":
        agent.files -= {"old0", "old1"}
    return agent


RESUMABLE = {
    SPhase.START: ["none", "copying"],
    SPhase.MIRROR: ["copying", "synced", "failed"],
    SPhase.PIVOT: ["synced", "pivoted"],
    SPhase.PIVOT_CHECK: ["synced", "pivoted", "failed"],
    SPhase.RELEASE: ["pivoted", "released"],
    SPhase.ROLLBACK: ["copying", "failed", "none", "pivoted"],
}


@pytest.mark.parametrize(("phase", "found"), [(p, f) for p, fs in RESUMABLE.items() for f in fs])
def test_a_restarted_manager_runs_every_phase_to_a_safe_end(phase: SPhase, found: str) -> None:
    agent = _agent_in(found)
    cancel = asyncio.Event()
    steps = 0

    async def persist(st: storage.Step, status: MirrorStatus | None) -> None:
        nonlocal steps
        steps += 1
        assert steps < 5000, "the machine does not end"

    final = asyncio.run(
        storage.run(
            agent,
            persist,
            cancel,
            resume=storage.StorageState(phase=phase, active=found == "synced"),
            clock=lambda: agent.clock,
            poll_s=0,
        )
    )
    assert final.phase.final
    assert_one_good_copy(agent, final)
    if found in ("pivoted", "released"):
        # Switched is switched: a restarted rollback goes forward, never deletes the new copy.
        assert final.phase == SPhase.DONE and agent.files == {"new0", "new1"}


def test_a_restarted_manager_resumes_each_phase_safely() -> None:
    for phase in (SPhase.START, SPhase.MIRROR, SPhase.PIVOT, SPhase.RELEASE, SPhase.ROLLBACK):
        st_ = storage.step(storage.StorageState(phase=phase), storage.Restarted(), 0.0)
        assert st_.action in (storage.Action.POLL, storage.Action.ABORT, storage.Action.RELEASE)
        assert st_.action != storage.Action.ABORT or phase in (SPhase.START, SPhase.ROLLBACK)
    roundtrip = storage.state_from_json(
        storage.state_to_json(storage.StorageState(phase=SPhase.PIVOT_CHECK, warnings=("w",)))
    )
    assert roundtrip.phase == SPhase.PIVOT_CHECK and roundtrip.warnings == ("w",)


def test_an_agent_lost_for_good_after_the_pivot_leaves_the_vm_marked() -> None:
    """The pivot's answer is lost, then every call fails: whether the disks switched stays
    unknown, both copies are kept, and the VM is marked (the agent's record stays open)."""
    probe = FakeAgent()
    run(probe)
    pivot_call = probe.calls - 1
    faults = {pivot_call: "after"} | {k: "before" for k in range(pivot_call + 1, pivot_call + 99)}
    agent = FakeAgent(faults=faults)
    final = run(agent)
    assert final.phase == SPhase.FAILED and "pivot unknown" in (final.error or "")
    assert agent.phase == "pivoted"
    assert_one_good_copy(agent, final)  # among its checks: the VM is marked


@given(
    remaining=st.integers(min_value=0, max_value=1 << 40),
    rate=st.floats(min_value=0.0, max_value=1e11, allow_nan=False),
)
def test_the_poll_comes_sooner_near_the_copys_end_and_never_later(
    remaining: int, rate: float
) -> None:
    """The wait before the next status call: never longer than the poll interval, never a
    busy loop, and once what remains at the last rate fits in it, about that long."""
    status = MirrorStatus(
        vm="vm1", datastore="b", phase="mirroring", remaining_bytes=remaining, rate_bps=rate
    )
    wait = storage.poll_wait(0.2, status)
    assert storage.MIN_POLL_S <= wait <= 0.2
    if remaining == 0:
        assert wait == storage.MIN_POLL_S
    elif rate > 0 and remaining / rate < 0.2:
        assert wait == max(storage.MIN_POLL_S, remaining / rate)
    elif rate == 0:
        assert wait == 0.2
    assert storage.poll_wait(0.2, None) == 0.2
