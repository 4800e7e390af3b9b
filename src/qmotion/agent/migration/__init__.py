"""The agent's half of a live migration: outgoing on the source, incoming on the destination.

May import the agent's disks, vms and network rooms, its base (config, errors, tls, facts),
``qmotion.hypervisor``, ``qmotion.migration`` (parameters and constants) and ``qmotion.api``;
only ``qmotion.agent.app`` imports it.
"""
