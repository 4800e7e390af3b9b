"""The manager's HTTP face: the FastAPI app, its routes and the mapping of errors to statuses.

Imports anything of the manager below it (automation, tasks, the inventory and database) and
the wire models of ``qmotion.api``; nothing of the manager imports this package except
``qmotion.server.main``.
"""
