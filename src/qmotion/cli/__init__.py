"""The ``qmotion`` command line (Typer); one module per command group."""
