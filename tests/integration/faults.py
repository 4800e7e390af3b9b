"""The lab fault matrix's mechanics: what the client watches of the guest, how each phase is
reached and each fault injected, when things count as settled, and the table of outcomes."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from qmotion.api.migration import MigrationPhase as P
from qmotion.api.migration import MigrationTune
from qmotion.api.server import TaskOut, VmOut
from qmotion.api.vm import VmState
from qmotion.client import ClientError
from qmotion.client.server import ServerClient
from qmotion.hypervisor.process import is_qemu_of
from qmotion.lab import Lab
from qmotion.lab.netns import run_in
from qmotion.probe.guest import DISK_PORT, ECHO_PORT, ProbeError, query

PHASES = ("prepare", "copy", "device", "switchover", "verify")
FAULTS = ("destination_agent", "source_agent", "migration_link", "manager")
MATRIX = [(phase, fault) for phase in PHASES for fault in FAULTS]
# How long each fault lasts before it is undone (agent started again, link up, manager back).
DOWN_S = {"destination_agent": 5.0, "source_agent": 5.0, "migration_link": 6.0, "manager": 5.0}

TRIGGER_WAIT_S = 240.0  # for a migration to reach the case's phase
TASK_END_S = 420.0  # for the task to end once the fault is undone (finish retries back off)
SETTLE_S = 180.0  # for reconcile to leave one running copy that the inventory names
COPY_INTO_S = 1.5  # the copy fault comes this far into QEMU's active status
# The device-state fault. QEMU reports `device` only with pause-before-switchover (shared-
# nothing moves), and holds its big lock through the stop-and-copy, so the source's QMP does
# not answer then: the guest paused this long while QEMU was last seen active near its end is
# the stop-and-copy. A slowed link and a large allowed final chunk make it last ~2 s.
DEVICE_GAP_S = 0.3
DEVICE_NEAR_END = 96 << 20
DEVICE_DOWNTIME_MS = 2000  # the final chunk QEMU allows itself: ~2 s on the slowed link
SLOW_LINK_BPS = 20 << 20
ECHO_TIMEOUT_S = 150.0  # the session waits out long pauses (a destination held for the word)
ACK_SAMPLE_S = 0.5

BEFORE = {P.QUEUED, P.PENDING, P.PRECHECK}
LATE = {P.ANNOUNCE, P.STOP_SOURCE, P.UPDATE}


class GuestWatch:
    """What the client sees of the guest while a case runs: one TCP echo session held
    throughout (when it last answered, its longest gap, whether it survived) and the highest
    disk record the guest acknowledged, sampled twice a second (a copy running from older
    memory shows it going back)."""

    def __init__(self, namespace: str, ip: str) -> None:
        self.namespace, self.ip = namespace, ip
        self.last_reply = time.monotonic()
        self.received = 0
        self.max_gap_s = 0.0
        self.error: str | None = None
        self.acks: list[int] = []
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._outcome: str | None = None
        self._threads = [
            threading.Thread(target=run_in, args=(namespace, self._echo), daemon=True),
            threading.Thread(target=run_in, args=(namespace, self._sample), daemon=True),
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def paused_for(self) -> float:
        """Seconds since the guest last answered (0 once the session broke)."""
        return 0.0 if self.error else time.monotonic() - self.last_reply

    @property
    def max_acked(self) -> int:
        return max(self.acks, default=0)

    def went_back(self) -> list[tuple[int, int]]:
        """Samples lower than one before them: the guest lost acknowledged writes."""
        return [(a, b) for a, b in zip(self.acks, self.acks[1:], strict=False) if b < a]

    def stop(self) -> str:
        """Ends both (once); the echo session's outcome, for the table."""
        if self._outcome is not None:
            return self._outcome
        waiting = self.paused_for()
        self._stop.set()
        self._threads[0].join(timeout=2.0)
        if self._threads[0].is_alive() and self._sock is not None:
            # Still waiting for a reply: unblock it (the guest is not answering).
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self.error = self.error or f"no reply for {waiting:.1f} s at the end"
        for t in self._threads:
            t.join(timeout=5.0)
        gap = f"longest gap {self.max_gap_s * 1000:.0f} ms"
        self._outcome = f"broken ({self.error}); {gap}" if self.error else f"survived, {gap}"
        return self._outcome

    def _echo(self) -> None:
        try:
            with socket.create_connection((self.ip, ECHO_PORT), timeout=10.0) as s:
                self._sock = s
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.settimeout(ECHO_TIMEOUT_S)
                self.last_reply = time.monotonic()
                while not self._stop.is_set():
                    msg = f"{self.received:012d}\n".encode()
                    s.sendall(msg)
                    got = b""
                    while len(got) < len(msg):
                        chunk = s.recv(len(msg) - len(got))
                        if not chunk:
                            raise ProbeError("connection closed by the guest")
                        got += chunk
                    if got != msg:
                        raise ProbeError(f"reply {self.received} corrupt: {got!r}")
                    now = time.monotonic()
                    self.max_gap_s = max(self.max_gap_s, now - self.last_reply)
                    self.last_reply = now
                    self.received += 1
                    time.sleep(0.005)
        except Exception as exc:  # a probe thread reports, whatever broke the session
            if not self._stop.is_set():
                self.error = f"after {self.received} replies: {exc}"

    def _sample(self) -> None:
        while not self._stop.wait(ACK_SAMPLE_S):
            # A paused guest does not answer: that sample is skipped.
            with contextlib.suppress(Exception):
                status = query(self.ip, DISK_PORT, "status", timeout_s=2.0, wait_s=0.0)
                self.acks.append(int(status["acked"]))


class Agents:
    """One client per lab host, for the probes the triggers make (closed with the case)."""

    def __init__(self, lab: Lab) -> None:
        self.clients = {h.name: lab.agent(h.name, timeout_s=30) for h in lab.record.hosts}

    def close(self) -> None:
        for c in self.clients.values():
            c.close()

    def status(self, host: str, name: str) -> str | None:
        """QEMU's migration status on ``host`` (None: its agent did not answer)."""
        try:
            return str(self.clients[host].migration(name).status)
        except ClientError:
            return None

    def allow_downtime(self, host: str, name: str, ms: int) -> bool:
        """Let the running migration's final stop-and-copy take up to ``ms`` (False: it could
        not be told now)."""
        try:
            self.clients[host].tune_migration(name, MigrationTune(downtime_limit_ms=ms))
        except ClientError:
            return False
        return True

    def runs(self, host: str, name: str) -> bool:
        try:
            return self.clients[host].vm(name).state == VmState.RUNNING
        except ClientError:
            return False

    def wait_completed(self, host: str, name: str, deadline: float) -> bool:
        """Follow ``host``'s outgoing migration until QEMU completed it (True) or ended it
        otherwise (False). Long polls: the agent answers as QEMU's status changes."""
        known: str | None = None
        while time.monotonic() < deadline:
            try:
                stats = self.clients[host].migration(name, wait_ms=2000, known_status=known)
            except ClientError:
                time.sleep(0.05)
                continue
            if stats.status == "completed":
                return True
            if stats.status in ("failed", "cancelled"):
                return False
            known = str(stats.status)
        return False


def reached(
    phase: str, task: TaskOut, watch: GuestWatch, agents: Agents, state: dict[str, float]
) -> str | None:
    """What shows the case's phase in this sample of the task ('' : not yet; None: past it).

    ``state`` carries what earlier samples saw (when QEMU's copy became active)."""
    now, p = time.monotonic(), task.phase
    name, src, dst = task.vm or "", task.source or "", task.destination or ""
    stats = task.stats
    active = p == P.MONITOR and stats is not None and stats.status == "active"
    if active:
        state.setdefault("active_since", now)
    if phase == "prepare":
        if p == P.PREPARE:
            return "task in prepare_destination"
        return "" if p is None or p in BEFORE else None
    if phase in ("copy", "device"):
        if p is not None and p not in BEFORE | {P.PREPARE, P.START, P.MONITOR}:
            return None
        if p != P.MONITOR or stats is None:
            return ""
        if phase == "device" and stats.status in ("device", "pre-switchover"):
            return f"source in {stats.status} ({stats.remaining >> 20} MiB left)"
        if not active:
            return ""
        if phase == "copy" and now - state["active_since"] >= COPY_INTO_S:
            return f"copying: {stats.transferred >> 20} MiB sent, {stats.remaining >> 20} left"
        gap = watch.paused_for()
        if phase == "device" and gap >= DEVICE_GAP_S and stats.remaining <= DEVICE_NEAR_END:
            return f"guest paused {gap:.2f} s in the stop-and-copy ({stats.remaining >> 20} MiB)"
        return ""
    if phase == "switchover":
        if p == P.VERIFY:
            return "task in verify_destination"
        if p == P.MONITOR and agents.status(src, name) == "completed":
            return "source completed, task still in monitor"
        return None if p in LATE else ""
    if p in LATE:
        return f"task in {p}"
    if p == P.VERIFY and agents.runs(dst, name):
        return "destination runs, task in verify_destination"
    return ""


def await_phase(
    client: ServerClient, task: TaskOut, phase: str, watch: GuestWatch, agents: Agents
) -> str | None:
    """Follow the migration until the case's phase; what showed it (None: the migration went
    past it uncaught). The switchover and what follows last milliseconds: once QEMU copies,
    they are followed on the agents themselves rather than through the task."""
    seen: dict[str, float] = {}
    tuned = False
    deadline = time.monotonic() + TRIGGER_WAIT_S
    while time.monotonic() < deadline:
        task = client.task(task.id)
        if not task.state.active:
            return None
        hit = reached(phase, task, watch, agents, seen)
        if hit != "":
            return hit
        if phase in ("switchover", "verify") and "active_since" in seen:
            return follow_switchover(client, task, phase, agents, deadline)
        if phase == "device" and not tuned and "active_since" in seen:
            tuned = agents.allow_downtime(task.source or "", task.vm or "", DEVICE_DOWNTIME_MS)
        time.sleep(0.01)
    raise AssertionError(
        f"task {task.id} did not reach {phase} in {TRIGGER_WAIT_S:.0f} s: {task.state}/{task.phase}"
    )


def follow_switchover(
    client: ServerClient, task: TaskOut, phase: str, agents: Agents, deadline: float
) -> str | None:
    """switchover: the moment the source's QEMU completed (the destination, paused, runs on
    the word); verify: the moment the destination runs, with the task still going."""
    name, src, dst = task.vm or "", task.source or "", task.destination or ""
    if not agents.wait_completed(src, name, deadline):
        return None
    if phase == "switchover":
        return "source completed"
    while time.monotonic() < deadline:
        if agents.runs(dst, name):
            now = client.task(task.id)
            return f"destination runs, task in {now.phase}" if now.state.active else None
        time.sleep(0.005)
    return None


def inject(lab: Lab, fault: str, source: str, destination: str) -> None:
    """The fault, held for its time, then undone; returns once it is."""
    down = DOWN_S[fault]
    if fault == "destination_agent":
        lab.kill_agent(destination, down_s=down)
    elif fault == "source_agent":
        lab.kill_agent(source, down_s=down)
    elif fault == "migration_link":
        with lab.migration_link_down(destination):
            time.sleep(down)
    elif fault == "manager":
        lab.restart_manager(crash=True, down_s=down)
    else:
        raise ValueError(f"unknown fault {fault!r}")


def wait_end(client: ServerClient, task_id: int, timeout_s: float = TASK_END_S) -> TaskOut:
    """The task once it ended; a manager that does not answer for a while is waited for."""
    deadline = time.monotonic() + timeout_s
    last: TaskOut | str = "no answer"
    while time.monotonic() < deadline:
        try:
            last = client.task(task_id)
            if not last.state.active:
                return last
        except ClientError as exc:
            last = str(exc)
        time.sleep(0.5)
    if isinstance(last, TaskOut):
        events = "; ".join(f"{e.at:%H:%M:%S} {e.message}" for e in last.events[-12:])
        last = f"{last.state}/{last.phase}: {events}"
    raise AssertionError(f"task {task_id} did not end within {timeout_s:.0f} s: {last}")


def qemus_of(vm_uuid: uuid.UUID) -> list[int]:
    """Every live QEMU of the VM on this machine (every lab host's), listed or not."""
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    return [pid for pid in pids if is_qemu_of(pid, vm_uuid)]


@dataclass
class Settled:
    host: str
    inventory: VmOut


def observe(lab: Lab, client: ServerClient, vm: VmOut) -> Settled | str:
    """Settled (exactly one copy anywhere, running, one QEMU, the inventory naming its host
    with nothing pending), or what is still wrong."""
    copies: dict[str, VmState] = {}
    for h in lab.record.hosts:
        try:
            with lab.agent(h.name, timeout_s=30) as agent:
                for v in agent.list_vms():
                    if v.name == vm.name:
                        copies[h.name] = v.state
        except ClientError as exc:
            return f"{h.name}'s agent: {exc}"
    try:
        shown = client.vm(vm.name)
    except ClientError as exc:
        return f"manager: {exc}"
    problems = []
    running = [h for h, s in copies.items() if s == VmState.RUNNING]
    if len(running) != 1 or len(copies) != 1:
        problems.append(f"copies {copies or 'none'}")
    if running and shown.host != running[0]:
        problems.append(f"inventory names {shown.host}")
    if shown.state != VmState.RUNNING:
        problems.append(f"inventory state {shown.state}")
    if shown.migrating or shown.attention:
        problems.append(f"inventory: migrating={shown.migrating}, attention={shown.attention}")
    qemus = qemus_of(uuid.UUID(vm.uuid))
    if len(qemus) != 1:
        problems.append(f"{len(qemus)} QEMU processes of the VM ({qemus})")
    if problems:
        return "; ".join(problems)
    return Settled(running[0], shown)


def settle(lab: Lab, client: ServerClient, vm: VmOut, timeout_s: float = SETTLE_S) -> Settled:
    """Refresh (reconcile runs there) until settled; fails naming what is still wrong."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(ClientError):
            client.refresh_hosts()
        seen = observe(lab, client, vm)
        if isinstance(seen, Settled):
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(f"{vm.name} not settled after {timeout_s:.0f} s: {seen}")
        time.sleep(1.0)


def remove_everywhere(lab: Lab, name: str) -> None:
    """Leave nothing of the VM, whatever the case left: the inventory's record and every copy
    (a copy another host reports makes the manager refuse the forced delete at first)."""
    with contextlib.suppress(ClientError), lab.server(timeout_s=60) as client:
        client.delete_vm(name, force=True)
    for h in lab.record.hosts:
        with contextlib.suppress(ClientError), lab.agent(h.name, timeout_s=60) as agent:
            if name in [v.name for v in agent.list_vms()]:
                agent.delete(name, force=True)
    with contextlib.suppress(ClientError), lab.server(timeout_s=60) as client:
        client.delete_vm(name, force=True)


@dataclass
class Row:
    """One case's outcome, as the table shows it."""

    phase: str
    fault: str
    hit: str = ""
    attempts: int = 0
    source: str = ""
    destination: str = ""
    task: str = ""
    ended_on: str = ""
    settle_s: float | None = None
    memory: str = ""
    disk: str = ""
    echo: str = ""
    result: str = "not run"
    notes: list[str] = field(default_factory=list)

    @property
    def case(self) -> str:
        return f"{self.phase} x {self.fault.replace('_', ' ')}"


COLUMNS = (
    ("case", "case"),
    ("fault hit at", "hit"),
    ("tries", "attempts"),
    ("move", "move"),
    ("task", "task"),
    ("VM on", "ended_on"),
    ("settle s", "settle_s"),
    ("memory", "memory"),
    ("disk records", "disk"),
    ("echo session", "echo"),
    ("result", "result"),
)


def _cell(row: Row, key: str) -> str:
    if key == "case":
        return row.case
    if key == "move":
        return f"{row.source}→{row.destination}" if row.source else ""
    value = getattr(row, key)
    return "" if value is None else str(value).replace("|", "/").replace("\n", " ")


def _provenance() -> str:
    def out(*cmd: str) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
            return done.stdout.strip().splitlines()[0] if done.stdout.strip() else ""
        return ""

    commit = out("git", "-C", str(Path(__file__).parent), "rev-parse", "--short", "HEAD")
    dirty = out("git", "-C", str(Path(__file__).parent), "status", "--porcelain")
    qemu = out("qemu-system-x86_64", "--version")
    return f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, commit {commit}{'+' if dirty else ''}, {qemu}"


def write_table(rows: list[Row]) -> Path:
    """The table as Markdown and JSON: into bench/results when the whole matrix ran, else
    (a subset, as ``make test`` runs) into the temporary directory."""
    full = {(r.phase, r.fault) for r in rows} >= set(MATRIX)
    root = Path(__file__).resolve().parents[2] / "bench" / "results"
    out = root / "faults.md" if full else Path(tempfile.gettempdir()) / "qmotion-faults.md"
    order = {case: i for i, case in enumerate(MATRIX)}
    rows = sorted(rows, key=lambda r: order.get((r.phase, r.fault), len(order)))
    held = ", ".join(f"{k.replace('_', ' ')} {v:.0f} s" for k, v in DOWN_S.items())
    lines = [
        "# Faults on real guests in the lab",
        "",
        f"Run {_provenance()}.",
        "",
        "Each case: a TCG guest writing memory and O_DSYNC disk records, a TCP echo session held",
        "from the client, one live migration, the fault at the phase, undone after",
        f"{held}; then refreshes until one copy runs and the inventory names it",
        "(`make faults`, tests/integration/test_faults.py).",
        "",
        "| " + " | ".join(title for title, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(_cell(r, key) for _, key in COLUMNS) + " |" for r in rows]
    notes = [f"- {r.case}: {n}" for r in rows for n in r.notes]
    if notes:
        lines += ["", "Notes:", "", *notes]
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return out
