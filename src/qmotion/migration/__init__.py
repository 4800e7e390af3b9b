"""The live-migration engine: pure state machine, pure pre-checks, parameters, and the runner.

Also the pure Storage vMotion and cold-migration machines and the convergence model. Imports
only the ground floor (``qmotion.api``, errors): the I/O lives in the manager's port.
"""
