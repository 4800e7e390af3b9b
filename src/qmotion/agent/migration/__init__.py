"""The agent's half of a live migration: outgoing on the source, incoming on the destination.

``migrate.Migrations`` is the facade the agent's routes call. Below it, by side (libvirt's Src
and Dst): ``outgoing`` (the source) and ``incoming`` (the destination), with the source's
Confirm (``confirm``: release or resume, for one migration's id) and the destination's Finish
(``finish``: a paused destination runs on the word); by concern: ``guard`` (a switchover that
hangs while the guest is paused is yanked), ``params`` (what QEMU is told about a stream),
``dirty`` (dirty-rate sampling) and ``peer`` (the one place the source's client to the
destination agent is built, and its calls).

May import the agent's disks, vms, facts and network rooms, its base (config, errors, tls),
``qmotion.hypervisor``, ``qmotion.migration`` (parameters and constants) and ``qmotion.api``;
only ``qmotion.agent.app`` imports it.
"""
