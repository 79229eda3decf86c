"""The Perceptio model (SPEC §1, §3): InternVL loading and the new tokens (``internvl``), the SAM2
mask decoder (``sam2_decoder``), the composite model (``perceptio_model``), batching a sample into
tensors (``batching``), the losses (``losses``), constrained generation (``generation``) and the
conversion of OpenGVLab-layout InternVL checkpoints to the transformers layout (``convert``).

May import: the root modules, ``format``, ``data`` and ``depth``. Never ``curation``,
``training`` or ``evaluation``.
"""
