"""The synthetic world the offline default runs on: ray-traced scenes with true depth and masks
(``render``, ``scenes``), their words (``expressions``: referring expressions, captions, questions)
and the writers that lay them out in the public on-disk formats (``writers``), driven by
:func:`~perceptio_core.world.synth.generate_world`.

May import: the root modules, ``format`` and ``data`` (it writes what the readers read). Never
``model``, ``training`` or ``evaluation``.
"""
