"""DRS: pure placement and load balancing on a cluster snapshot (no I/O, clock passed in).

May import ``qmotion.migration`` (the pre-checks' capacity model) and the ground floor; never
the manager, which gathers the snapshot and applies what the planner returns.
"""
