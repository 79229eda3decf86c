"""The one training loop and every fit that runs on it (SPEC §4): the loop with its checkpoints and
exact resume (``trainer``), its warm-up + cosine schedule and the one hold-out rule by image digest
(``schedule``), the order it visits the data in (``sampler``), what it needs to run sharded
(``sharding``: FSDP2 on CPU process groups, DeepSpeed's clipping, the layer classes to wrap), where
it tracks its curves (``tracking``: TensorBoard, W&B, MLflow through accelerate's trackers), and
the fits: the offline stand-ins for the released checkpoints (``teacher_fit``:
Depth Anything V2; ``base_fit``: InternVL; ``sam2_fit``: SAM2), the depth codebook
(``vqvae_fit``) and Perceptio's LoRA fine-tuning (``finetune``).

May import: every other subpackage (it is the top of the library); nothing imports it but
``tasks``, ``flows`` and the benchmarks.
"""
