"""The one training loop and every fit that runs on it (SPEC §4): the loop with its checkpoints and
exact resume (``trainer``), its warm-up + cosine schedule and hold-out rule (``schedule``), and the
fits: the offline stand-ins (``base_fit``, ``sam2_fit``) and Perceptio's LoRA fine-tuning
(``finetune``).

May import: every other subpackage (it is the top of the library); nothing imports it but
``tasks``, ``flows`` and the benchmarks.
"""
