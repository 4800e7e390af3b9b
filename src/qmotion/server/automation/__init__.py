"""What the manager does on its own: DRS on the live cluster, maintenance mode, cluster
operations in waves, and scheduled actions.

Builds on ``tasks`` (every move is a task) and the manager's base; may import ``qmotion.drs``
(the pure planner) and ``qmotion.api``; never ``http``.
"""
