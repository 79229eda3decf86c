"""The sequence format (SPEC §1): the perception tokens (``tokens``), the target a sample is
trained on and the parse of a generation (``target``), and the prompt templates (``prompts``).

May import: ``perceptio_core.config`` and the root helpers only. Everything else builds on it.
"""
