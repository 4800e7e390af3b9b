"""``python -m qmotion``: the same CLI as the ``qmotion`` console script."""

from qmotion.cli.main import app

app(prog_name="qmotion")
