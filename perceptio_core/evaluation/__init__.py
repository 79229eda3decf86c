"""Evaluation (SPEC §6): metrics (``metrics``), answer parsing (``answers``), the benchmarks and
the report (``evaluate``, ``report``), single-image inference (``infer``) and pictures (``viz``).

May import: the root modules, ``format``, ``data``, ``depth`` and ``model``. Never ``training``
(evaluation loads a stored checkpoint; it never runs inside the loop).
"""
