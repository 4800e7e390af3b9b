"""Long operations as persisted tasks: the runner, the live migration's port to the agents,
Storage vMotion, shared-nothing and cold moves, measurements, and the task as the API shows it.

May import the manager's base (inventory, images, database, agent connector, errors),
``qmotion.migration`` (the pure engines), ``qmotion.client`` and ``qmotion.api``; never
``automation`` or ``http``.
"""
