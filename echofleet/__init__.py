"""echofleet — the shell on top of the layers: the ``echofleet`` command (``echofleet.cli``, one module
per command group) and the compositions that wire the lower packages together (a local federation:
``echofleet.simulation``). Nothing below imports this package (import-linter checks)."""
