"""The ``qmotion`` command line (Typer); one module per command group.

The top floor, which nothing imports: talks to the manager only through ``qmotion.client``;
starts the manager, an agent or a lab in-process (``qmotion server``, ``qmotion agent``,
``qmotion lab``) and may read ``qmotion.drs`` for offline planning on a snapshot file.
"""
