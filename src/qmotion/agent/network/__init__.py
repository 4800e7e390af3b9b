"""The host network as migrations need it: bridges and taps, steering a VM's traffic at
switchover, late-frame forwarding, the first frames after a resume, and path probes.

The lowest room of the agent: imports only the agent's errors and ``qmotion.api``.
"""
