"""The randomized fault campaign of issue 22: the real manager against the scripted agents.

The manager is the real one (task runner, migration port and machine, storage and
shared-nothing moves, DRS, maintenance, reconcile, recovery after a restart), wired as the app
wires it (``manager``); the agents are tests.unit.agent_world's, which answer as
qmotion.agent does, with a seam that strikes a fault at any request (``world``). A schedule
(``schedule``) of operations (migrations, shared-nothing and storage moves, cancels, DRS
applies, maintenance) runs one operation after another, each while the earlier ones may still
run (``driver``); the invariants (``invariants``) are checked at every agent request and at
the end. A schedule that breaks one is shrunk to a minimal one (``shrink``), printed as Python
to replay as a test. ``python -m tests.unit.campaign`` runs it long; tests/unit/test_campaign.py
a fixed part of it in ``make test``.

Why a schedule generator of our own and not hypothesis' stateful testing: the faults strike
inside the manager's work, at agent requests that a rule boundary never sees (the k-th
request of a rollback, QEMU completing as the cancel arrives), and they must be decided where
the request is served; a fault is tied to its request's key (host, method, path, occurrence)
and drawn from its own random stream, so that it does not move when an unrelated operation is
shrunk away. The whole run is deterministic (``simloop``: one thread, simulated time), so a
seed replays exactly, a recorded schedule replays exactly, and shrinking is delta debugging on
what the schedule names (operations, faults, VMs), with no search state of its own to keep.
"""
