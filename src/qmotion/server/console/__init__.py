"""The manager's web console at ``/ui/``: server-rendered pages over the API's own services.

Sits between ``http`` (which installs it) and ``automation``: imports the services the API's
routes use (``automation``, ``tasks``, the inventory, access) and the wire models of
``qmotion.api``, never ``http`` and never its own HTTP API. A page shows what the API would
answer; a form does what the API route it stands for does, with the same role check.
"""
