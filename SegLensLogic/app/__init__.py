"""Orchestration, the top layer: the ``seglens`` command (:mod:`.cli`, one ``<concept>_commands`` module per command
group, :mod:`.arguments`), the demo and its report, the reference build and the resumable pipeline they run on.

Nothing below imports this package (``Testing/test_architecture.py`` checks the layer order).
"""
