"""The benchmark harness behind ``adamnx bench``: tasks, baseline optimizers, runner, report and plots.

Needs the ``bench`` extra (``pip install -e ".[bench]"`` in a clone of adamnx).
"""
