"""The manager: cluster inventory, tasks, the REST API the CLI talks to and the web console.

Rooms, top to bottom: ``main`` over ``http/`` over ``console/`` over ``automation/`` over
``tasks/``; the inventory, image library, database, agent connector, errors and reconcile
(the agents' VMs against the inventory, after every host refresh) are the base every room
uses.
May import ``qmotion.drs`` (the pure planner), ``qmotion.migration`` (the pure engines),
``qmotion.client`` (the agents' clients), ``qmotion.pki`` and the ground floor; never the
agent or the lab, which it reaches only over HTTP.
"""
