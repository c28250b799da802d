"""``python -m echofleet.cli ...`` is the ``echofleet`` command."""

from echofleet.cli import main

main()
