"""Built-in training scenarios whose diagnosis is known in advance, and the ``optdiag demo`` command.

* :mod:`optdiag.demo.scenarios`: the LightningModules, data and ground truth of each scenario.
* :mod:`optdiag.demo.runner`: train them with :class:`optdiag.OptDiag` and check the findings against the truth.
* :mod:`optdiag.demo.figures`: one figure per scenario (loss with verdicts, curvature against the threshold).
* :mod:`optdiag.demo.cli`: ``optdiag demo [--scenario NAME|all] [--out DIR]``.

Nothing heavy is imported here: the CLI parser imports this package whenever it is built.
"""
