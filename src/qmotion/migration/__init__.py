"""The live-migration engine: pure state machine, pure pre-checks, parameters, and the runner."""
