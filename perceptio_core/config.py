"""Typed configuration: one dataclass per component, loaded from YAML profiles (``configs/``).

A profile is a YAML mapping of sections to fields; ``--set section.key=value`` overrides any field
(the value is parsed as YAML, so ``--set vqvae.steps=10`` gives an int). An unknown section or key,
or a value of the wrong type, raises :class:`ConfigError` naming the dotted key. Derived values are
computed in ``__post_init__`` so that overriding a base field never leaves them stale.

Where SPEC.md gives no legible paper value (the loss weights, the codebook size) the default is the
SPEC's stated default and the field's comment says so.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A profile or override names an unknown key or gives a value of the wrong type."""


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


TRACKERS = ("tensorboard", "wandb", "mlflow")  # run.trackers: what accelerate's tracker API may log to


@dataclass
class RunConfig:
    """Where a run keeps its things, what it runs on and where its curves are tracked."""

    workdir: str = "perceptio-work"
    store: str = ""  # artifact store: a local path or any fsspec URL; "" -> <workdir>/store
    device: str = "auto"  # "auto" (cuda when present), "cpu", "cuda"
    seed: int = 0
    torch_threads: int = 0  # 0: the CLI's default, half the cores (perceptio_core.device.default_cpu_threads); n: n threads
    lock_wait_s: float = 3600.0  # a run finding its workdir in use waits this long for it, then stops
    # experiment trackers the training curves and each stage's metrics go to (tensorboard, wandb,
    # mlflow; [] turns tracking off); logs under <workdir>/tracking/<run id>/<stage>
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])

    def __post_init__(self) -> None:
        bad = [t for t in self.trackers if t not in TRACKERS]
        if bad or len(set(self.trackers)) != len(self.trackers):
            raise ConfigError(f"run.trackers must list distinct trackers among {', '.join(TRACKERS)} "
                              f"([] turns tracking off), got {self.trackers}")
        dev = self.device
        if dev not in ("auto", "cpu", "cuda") and not (dev.startswith("cuda:") and dev[5:].isdigit()):
            raise ConfigError(f"run.device must be auto, cpu, cuda or cuda:N, got {dev!r}")
        if self.lock_wait_s < 0:
            raise ConfigError(f"run.lock_wait_s must be >= 0 (0: stop at once), got {self.lock_wait_s}")
        if self.torch_threads < 0:
            raise ConfigError(f"run.torch_threads must be >= 0 (0: torch's default), got {self.torch_threads}")


@dataclass
class DataConfig:
    """Which datasets to read. ``root`` unset: the synthetic world is generated into the workdir.

    Paths are relative to ``root`` unless absolute; ``""`` (null for the conversation files) skips
    a dataset, and a named one the disk lacks is listed, with the ``--set`` that skips it, in one
    error before anything runs. The training datasets (REFER + COCO images, ADE20k, the captions,
    LLaVA / GLaMM) are the ``sources`` stage's; the captions are read only while the offline base
    is fit (``model.base`` unset). The evaluation benchmarks (``hardblink``, ``mcq``, ``mme``) are the
    ``benchmarks`` stage's, demanded only by runs that reach ``evaluate``: changing them re-runs
    evaluation, never a training stage."""

    root: str | None = None
    refer_datasets: list[str] = field(default_factory=lambda: ["refcoco", "refcoco+", "refcocog"])
    # which refs(<split_by>).p each REFER dataset reads (refcocog also ships "google")
    refer_split_by: dict[str, str] = field(
        default_factory=lambda: {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}
    )
    coco_images: str = "images/train2014"  # relative to root
    ade20k: str = "ADEChallengeData2016"  # relative to root; "" to skip
    hardblink: str = "HardBLINK"  # relative to root; "" to skip
    # multiple-choice benchmarks in VLMEvalKit's TSV layout, name -> TSV (relative to root or
    # absolute; "" skips one): MMBench, SEED-Bench, AI2D, MMStar, ScienceQA ... (the world's: its MMBench)
    mcq: dict[str, str] = field(default_factory=lambda: {"mmbench": "vqa/mmbench_world.tsv"})
    mme: str = "MME_Benchmark_release_version"  # MME's release folder, relative to root; "" to skip
    captions: str = "annotations/captions_train2014.json"  # relative to root; "" to skip
    llava_json: str | None = "llava/llava_world.json"  # LLaVA-1.5 instruction JSON (SPEC §5; relative
    # to root or absolute; the world's: its train VQA as conversations); null: none
    glamm_json: str | None = "glamm/GranDf_world_GCG_train.json"  # GLaMM GranD-f GCG JSON (SPEC §5;
    # relative to root or absolute; the world's: grounded captions of its training images); null: none


@dataclass
class SynthConfig:
    """The synthetic world (used when ``data.root`` is unset)."""

    images: int = 240  # COCO-style images carrying the RefCOCO/+/g trees
    ade_images: int = 120
    hardblink_per_count: int = 124  # HardBLINK-style questions for each of 3, 4, 5 points (as the public set)
    vqa_questions: int = 240  # half train (also the LLaVA-format instruction file), half dev
    mme_images: int = 12  # MME images per subtask (existence, count, position, color), 2 questions each
    width: int = 128
    height: int = 96
    seed: int = 0

    def __post_init__(self) -> None:
        if self.images < 1 or min(self.ade_images, self.hardblink_per_count, self.vqa_questions, self.mme_images) < 0:
            raise ConfigError("synth: images must be >= 1 and the other counts >= 0")
        if min(self.width, self.height) < 32:
            raise ConfigError(f"synth: images of {self.width}x{self.height} are too small (32 px a side at least)")
        if self.hardblink_per_count and (self.width < 64 or self.height < 48):
            raise ConfigError(
                f"synth: HardBLINK needs images of at least 64x48 to place 5 labelled points "
                f"(got {self.width}x{self.height}); set synth.hardblink_per_count=0 or enlarge them"
            )


@dataclass
class TeacherFitConfig:
    """The offline default: fit a small Depth Anything V2 config on the world's true depth."""

    hidden_size: int = 64
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    patch_size: int = 14
    fusion_hidden_size: int = 32
    steps: int = 400
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.05
    grad_weight: float = 0.5  # weight of the multi-scale gradient-matching term (MiDaS)
    holdout_fraction: float = 0.1  # images kept out of the fit, only evaluated (reported metrics)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_hidden_layers < 4:
            raise ConfigError(f"teacher.fit.num_hidden_layers must be >= 4 (the DPT neck reads 4), "
                              f"got {self.num_hidden_layers}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"teacher.fit.hidden_size ({self.hidden_size}) must be a multiple of "
                              f"num_attention_heads ({self.num_attention_heads})")
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("teacher.fit.steps and batch_size must be >= 1 and lr > 0")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ConfigError(f"teacher.fit.holdout_fraction must be in [0, 1), got {self.holdout_fraction}")


@dataclass
class TeacherConfig:
    """Depth Anything V2 teacher (SPEC §2). ``checkpoint`` is a local directory or hub id; unset, the
    ``fit_teacher`` stage fits one on the synthetic world and the teacher loads that directory."""

    checkpoint: str | None = None
    input_size: int = 112  # the processor's target size (518 at paper scale)
    map_size: int = 80  # stored maps are map_size x map_size, per-image min-max normalised to [0, 1]
    batch_size: int = 16
    num_workers: int = 0
    chunk_size: int = 64  # maps per durable chunk (a killed run resumes at chunk granularity)
    precision: str = "auto"  # "auto" (bf16 on cuda, fp32 on cpu), "fp32", "bf16", "fp16"
    fit: TeacherFitConfig = field(default_factory=TeacherFitConfig)

    def __post_init__(self) -> None:
        if self.input_size <= 0 or self.input_size % self.fit.patch_size:
            raise ConfigError(f"teacher.input_size ({self.input_size}) must be a positive multiple of "
                              f"the patch size ({self.fit.patch_size})")
        if self.map_size < 1 or self.batch_size < 1 or self.num_workers < 0 or self.chunk_size < 1:
            raise ConfigError("teacher.map_size, batch_size and chunk_size must be >= 1, num_workers >= 0")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"teacher.precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")


@dataclass
class VQVAEConfig:
    """Depth VQ-VAE (SPEC §2). K is not legible in the paper: default 128 (SPEC's default)."""

    codebook_size: int = 128
    code_dim: int = 128
    grid: int = 10  # latent grid side: grid * grid = N tokens per map
    input_size: int = 80  # maps are resized to input_size; input_size / grid = downsampling factor
    hidden: int = 64  # channels at the latent grid (halved per resolution doubling, 16 at least)
    steps: int = 400
    batch_size: int = 32
    lr: float = 1e-3
    ema_decay: float = 0.99
    commitment: float = 0.25  # weight of the commitment term (the codebook itself moves by EMA)
    # a code whose EMA count of assigned vectors per batch falls below this is restarted at a random
    # encoder output of the batch (per batch: batch_size * grid^2 vectors over codebook_size codes)
    dead_code_threshold: float = 1.0
    holdout_fraction: float = 0.1
    seed: int = 0
    downsample: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.grid <= 0 or self.input_size % self.grid or self.input_size // self.grid < 2:
            raise ConfigError(
                f"vqvae.input_size ({self.input_size}) must be a multiple of vqvae.grid ({self.grid}), "
                "at least twice it"
            )
        if self.codebook_size < 2 or self.code_dim < 1 or self.hidden < 1:
            raise ConfigError("vqvae.codebook_size must be >= 2, code_dim and hidden >= 1")
        if not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"vqvae.ema_decay must be in (0, 1), got {self.ema_decay}")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ConfigError(f"vqvae.holdout_fraction must be in [0, 1), got {self.holdout_fraction}")
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError(f"vqvae.steps and batch_size must be >= 1 and lr > 0 (got steps={self.steps}, "
                              f"batch_size={self.batch_size}, lr={self.lr})")
        self.downsample = self.input_size // self.grid

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid


@dataclass
class CurateConfig:
    """Sources to samples to WebDataset shards (SPEC §5, §6; ``perceptio_core/curation/curate.py``).

    Splits use normalised names ("train", "val", "testA", "testB", "test"; ADE20k's "training" is
    "train"). Mask areas are in pixels of the original image. Teacher depth is relative inverse
    depth normalised to [0, 1] per image: larger is nearer.
    """

    tasks: list[str] = field(
        default_factory=lambda: ["refer_seg", "semantic_seg", "depth_cot", "instruct", "grounded_conv"]
    )  # which sample kinds to build; "instruct"/"grounded_conv" also need data.llava_json/glamm_json
    # the perception signals the targets carry (the paper's ablations, §4.2): "seg" ([SEG] and its
    # masks) and "depth" (the depth block); one left out is taken out of every target
    perception: list[str] = field(default_factory=lambda: ["seg", "depth"])
    splits: list[str] = field(default_factory=lambda: ["train"])  # RefCOCO/+/g and ADE20k splits kept
    seed: int = 0  # point sampling of the depth chain-of-thought samples
    # filters (SPEC §5: degenerate masks, ambiguity, near-duplicates)
    min_mask_area: int = 32  # pixels; smaller masks are dropped as degenerate
    max_mask_frac: float = 0.95  # masks covering more of the image are dropped as degenerate
    dedup_jaccard: float = 0.8  # same object, token-set Jaccard >= this: keep the first expression
    ambiguity_filter: bool = True
    drop_eval_overlap: bool = False  # drop train refs whose image is in any refer val/test split
    # RefCOCO/+/g: one sample per image, its expressions as rounds of one conversation (SPEC §5);
    # [min, max] rounds, as Sa2VA samples 3 to 5: each image draws its count from (seed, image) and
    # takes that many of its kept expressions (objects round-robin), or all when it has fewer
    refer_rounds_per_sample: list[int] = field(default_factory=lambda: [3, 5])
    # ADE20k semantic segmentation
    ade_max_classes_per_image: int = 3  # largest present classes first
    # depth chain-of-thought (HardBLINK-style, SPEC §6)
    depth_cot_sources: list[str] = field(default_factory=lambda: ["coco"])  # "coco", "ade20k"
    depth_cot_per_image: int = 6  # point sets per image (docs/experiments.md: why 6)
    depth_cot_min_points: int = 2
    depth_cot_max_points: int = 5
    min_point_distance: float = 20.0  # pixels between any two marked points
    depth_cot_margin: float = 0.1  # every pair of points differs by this much in teacher depth
    depth_cot_max_tries: int = 200  # candidate points per sample before giving up on an image
    # optional instruction / grounded-conversation sources (paths come from the data section)
    llava_image_root: str | None = None  # unset: the LLaVA JSON's folder
    glamm_image_root: str | None = None  # unset: the GLaMM JSON's folder
    # shards (ARCHITECTURE: a few hundred MB each at scale)
    shard_max_bytes: int = 256 * 1024 * 1024
    shard_max_samples: int = 10000

    def __post_init__(self) -> None:
        known = {"refer_seg", "semantic_seg", "depth_cot", "instruct", "grounded_conv"}
        unknown = sorted(set(self.tasks) - known)
        if unknown:
            raise ConfigError(f"curate.tasks: unknown task(s) {unknown} (known: {sorted(known)})")
        if not set(self.perception) <= {"seg", "depth"}:
            raise ConfigError(f"curate.perception: unknown signal(s) {sorted(set(self.perception) - {'seg', 'depth'})} "
                              "(known: seg, depth)")
        if "seg" not in self.perception and {"semantic_seg", "grounded_conv"} & set(self.tasks):
            raise ConfigError("curate.perception without seg leaves semantic_seg and grounded_conv samples nothing to "
                              "learn: drop them from curate.tasks too")
        if "depth" not in self.perception and "depth_cot" in self.tasks:
            raise ConfigError("curate.perception without depth leaves depth_cot samples nothing to learn: drop it "
                              "from curate.tasks too")
        rr = self.refer_rounds_per_sample
        if len(rr) != 2 or not 1 <= int(rr[0]) <= int(rr[1]):
            raise ConfigError("curate.refer_rounds_per_sample must be [min, max] with 1 <= min <= max")
        if not 2 <= self.depth_cot_min_points <= self.depth_cot_max_points <= 8:
            raise ConfigError("curate: need 2 <= depth_cot_min_points <= depth_cot_max_points <= 8 (A-H)")
        if not (0.0 < self.max_mask_frac <= 1.0 and 0.0 < self.dedup_jaccard <= 1.0):
            raise ConfigError("curate.max_mask_frac and curate.dedup_jaccard must lie in (0, 1]")
        if self.shard_max_bytes <= 0 or self.shard_max_samples <= 0 or self.depth_cot_per_image < 0:
            raise ConfigError("curate: shard_max_bytes, shard_max_samples must be > 0, depth_cot_per_image >= 0")


@dataclass
class TinyVLMConfig:
    """The offline default base (ARCHITECTURE "finetune"): a small InternVL built from
    ``InternVLConfig`` (InternVL vision tower, 2 layers x 64; Qwen2 text model, 4 layers x 128) with a
    byte-level BPE tokenizer trained on the world's texts. Used only when ``model.base`` is unset.
    4 x 128 is the smallest text model that learns to answer from its depth block
    (docs/experiments.md)."""

    tokenizer_vocab_size: int = 512  # BPE vocabulary before the K + 3 perception tokens are added
    image_size: int = 64  # InternVL tile side; (image_size / patch_size)^2 / 4 image tokens
    patch_size: int = 8
    vision_hidden_size: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    text_hidden_size: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate_size: int = 256
    max_position_embeddings: int = 2048


@dataclass
class ModelConfig:
    """The Perceptio model (SPEC §1, §4): InternVL + LoRA, ``[SEG]`` -> SAM2 mask decoder, depth
    tokens decoded by the frozen VQ-VAE. K and N are read from the depth tokenizer, not set here."""

    base: str | None = None  # transformers-format InternVL (dir or hub id; the paper: InternVL2.5
    # 8B / 4B in the HF "-hf" layout); unset: the tiny config below, built fresh
    tokenizer: str | None = None  # tokenizer dir or hub id; unset: the base's own
    dtype: str = "float32"  # weights of the base: "float32", "bfloat16" (paper scale), "float16"
    lora_rank: int = 16  # paper: 256
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    # LoRA targets inside the language model only (the vision tower and projector stay frozen)
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    sam2_variant: str = "tiny-128"  # "tiny-128", "tiny-test" or a SAM2.1 Hiera size: "sam2.1_hiera_tiny",
    # "sam2.1_hiera_small", "sam2.1_hiera_base_plus", "sam2.1_hiera_large"
    sam2_checkpoint: str | None = None  # Meta's released .pt ({"model": state_dict}); unset: the
    # fit_sam2 stage pre-trains the variant on the world's object masks
    freeze_sam2_image_encoder: bool = True  # SPEC §4: frozen (the mask decoder is fine-tuned)
    mask_threshold: float = 0.5  # sigmoid(mask logits) > threshold at inference (SPEC §1)
    max_length: int = 8192  # tokens per sequence (SPEC §4); longer targets are cut at the end
    gradient_checkpointing: bool = False  # on the language model; for paper-scale training
    max_tiles: int = 1  # dynamic tiling in training: 1 to max_tiles aspect-matched tiles + a thumbnail
    # (perceptio_core/model/processor.py); InternVL's fine-tuning uses 6; 1: one square tile
    tiny: TinyVLMConfig = field(default_factory=TinyVLMConfig)

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"model.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if not 0.0 < self.mask_threshold < 1.0:
            raise ConfigError(f"model.mask_threshold must be in (0, 1), got {self.mask_threshold}")
        if not 1 <= self.max_tiles <= 40:
            raise ConfigError(f"model.max_tiles must be in 1..40, got {self.max_tiles}")


@dataclass
class LossConfig:
    """The one-stage composite loss (SPEC §3):
    L = L_llm + w_seg * (bce * BCE + dice * Dice) + w_dtok * (w_marker * L_marker + w_token * L_token
    + w_count * L_count) + w_rec * L_rec.

    The paper's values of w_seg, w_marker, w_token, w_count, w_dtok and w_rec are not legible in our
    copy (SPEC §3): each defaults to 1.0. The BCE 1.0 / Dice 0.25 split is the SPEC's.
    """

    w_seg: float = 1.0  # paper value illegible: 1.0
    bce: float = 1.0  # SPEC §3
    dice: float = 1.0  # SPEC §3: 0.25 (the paper profiles); 1.0 for the tiny mask decoder
    # (docs/experiments.md)
    w_dtok: float = 1.0  # paper value illegible: 1.0
    w_marker: float = 1.0  # paper value illegible: 1.0
    w_token: float = 1.0  # paper value illegible: 1.0
    w_count: float = 1.0  # paper value illegible: 1.0
    w_rec: float = 1.0  # paper value illegible: 1.0
    rec_tau: float = 1.0  # L_rec temperature, softmax(logits / tau) (1.0: the plain softmax SPEC §3
    # writes; AiT's softmax(logits x 0.8) is rec_tau = 1.25)


@dataclass
class TrainLoopConfig:
    """The one training loop (``perceptio_core/training/trainer.py``; SPEC §4), shared by ``base`` and
    ``finetune``. ``steps`` counts optimizer updates; the global batch is batch_size * grad_accum *
    number of processes. AdamW, linear warm-up over ``warmup_frac`` of the steps then cosine to zero,
    gradient clipping at ``max_grad_norm`` (SPEC §4: 5%, 1.0)."""

    steps: int = 300
    epochs: float = 0.0  # > 0: steps = ceil(epochs * samples / global batch), derived from the
    # data and the process count when training starts (``steps`` is then ignored)
    batch_size: int = 4  # per process and micro-step (paper: 1 per GPU)
    grad_accum: int = 1  # micro-steps per optimizer step (paper: 8)
    lr: float = 5e-4
    weight_decay: float = 0.0  # on >= 2-D trainable tensors only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_frac: float = 0.05  # SPEC §4
    max_grad_norm: float = 1.0  # SPEC §4
    precision: str = "auto"  # "auto" (bf16 on CUDA, none on CPU), "no", "bf16", "fp16"
    num_workers: int = 2  # data loader worker processes (0: load in the training process)
    prefetch_factor: int = 2  # batches each worker prepares ahead
    shuffle: bool = True  # per-epoch permutation from (seed, epoch); False: manifest order
    shuffle_window_shards: int = 0  # 0: global permutation; w: shard order shuffled, samples
    # shuffled within groups of w shards (webdataset-like locality for network storage)
    seed: int = 0
    checkpoint_every: int = 100  # optimizer steps between resumable checkpoints
    keep_checkpoints: int = 2  # the last K complete checkpoints are kept
    find_unused_parameters: bool = True  # DDP: some trainable heads see no gradient in some
    # batches (e.g. the mask decoder on a batch without masks)

    def __post_init__(self) -> None:
        name = {"FinetuneConfig": "finetune", "BaseFitConfig": "base", "Sam2FitConfig": "sam2_fit"}.get(
            type(self).__name__, "train")
        checks = [
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.epochs >= 0, f"epochs must be >= 0 (0: use steps), got {self.epochs}"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1"),
            (self.lr > 0 and self.eps > 0, f"lr and eps must be > 0, got lr={self.lr}"),
            (0.0 <= self.warmup_frac < 1.0, f"warmup_frac must be in [0, 1), got {self.warmup_frac}"),
            (self.max_grad_norm > 0, f"max_grad_norm must be > 0, got {self.max_grad_norm}"),
            (self.precision in ("auto", "no", "bf16", "fp16"),
             f"precision must be auto, no, bf16 or fp16, got {self.precision!r}"),
            (self.num_workers >= 0 and self.prefetch_factor >= 1, "num_workers >= 0 and prefetch_factor >= 1"),
            (self.checkpoint_every >= 1 and self.keep_checkpoints >= 1, "checkpoint_every and keep_checkpoints >= 1"),
            (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"betas must be two values in [0, 1), "
                                                                          f"got {self.betas}"),
        ]
        for ok, why in checks:
            if not ok:
                raise ConfigError(f"{name}.{why}")


@dataclass
class FinetuneConfig(TrainLoopConfig):
    """The ``finetune`` stage (SPEC §3, §4): LoRA on the LLM (rank etc. in ``model``), the new token
    rows, the SAM2 mask decoder and the [SEG] projection, on the curated shards. The defaults fit
    the tiny profile on the CPU in minutes; the paper: lr 2e-5-ish, batch 1 x 8 accumulation x 64
    GPUs, rank 256."""

    steps: int = 2000
    batch_size: int = 4
    lr: float = 1e-3
    splits: list[str] = field(default_factory=lambda: ["train"])  # manifest splits trained on
    tasks: list[str] | None = None  # manifest tasks trained on (None: every task)


@dataclass
class BaseFitConfig(TrainLoopConfig):
    """The offline default's ``base`` stage: full fine-tuning of the tiny InternVL (``model.tiny``)
    on the world's captions and VQA, LLM NLL only, no perception tokens. Unused when ``model.base``
    names a released InternVL."""

    steps: int = 1200
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.01
    grounding: bool = True  # also describe the training-split referred objects (base_fit.grounding_examples)


@dataclass
class Sam2FitConfig(TrainLoopConfig):
    """The offline default's ``fit_sam2`` stage (:mod:`perceptio_core.training.sam2_fit`): promptable
    segmentation pre-training of the small SAM2 of ``model.sam2_variant`` on the training images'
    object masks, standing in for Meta's released checkpoint. Unused when ``model.sam2_checkpoint``
    names one."""

    steps: int = 2500  # phase 1: the mask decoder without its high-resolution features
    refine_steps: int = 1000  # phase 2 (high-res features on, from phase 1); 0: phase 1 only
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 0.01
    max_points: int = 3  # 1..max_points positive points per example
    box_prob: float = 0.3  # share of examples that also get their box
    holdout_fraction: float = 0.1  # images (by digest) kept out and scored
    eval_examples: int = 200  # examples scored for the point-prompt mIoU (train and holdout)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.refine_steps < 0:
            raise ConfigError("sam2_fit: refine_steps >= 0")
        if self.max_points < 1 or not 0.0 <= self.box_prob <= 1.0 or not 0.0 <= self.holdout_fraction < 1.0:
            raise ConfigError("sam2_fit: max_points >= 1, box_prob in [0, 1], holdout_fraction in [0, 1)")


@dataclass
class EvaluateConfig:
    """The ``evaluate`` stage (SPEC §6; :mod:`perceptio_core.evaluation.evaluate`): which benchmarks, how many
    samples each (0: all; a limited subset is spread evenly over the sorted records, the same on
    every run), decoding, and the report. By default every sample is evaluated (the world is sized
    so that the intervals tell: 124 HardBLINK questions per point count, every val/test
    expression); set limits for a quicker look (the smoke profile does)."""

    refer: bool = True  # RefCOCO / RefCOCO+ / RefCOCOg referring segmentation
    hardblink: bool = True
    mcq: bool = True  # the multiple-choice benchmarks of data.mcq (MMBench-style accuracy)
    mme: bool = True  # MME (acc / acc+ per subtask, perception and cognition scores)
    refer_datasets: list[str] | None = None  # None: every REFER dataset read (data.refer_datasets)
    refer_splits: list[str] = field(default_factory=lambda: ["val", "testA", "testB", "test"])  # those present
    refer_limit: int = 0  # expressions per dataset and split, 0: all (the world's: 1407 val/test in all)
    hardblink_limit: int = 0  # questions per point count, 0: all (the public set and the world: 124)
    mcq_limit: int = 0  # questions per benchmark, 0: all (train splits are never evaluated; the world's: 120)
    mme_limit: int = 0  # images per MME subtask (two questions each), 0: all
    unconstrained_limit: int = 12  # refer + HardBLINK prompts decoded again without the constraint
    constrained: bool = True  # constrained perception decoding (SPEC §1) for the main run
    max_new_tokens: int = 160  # N + 3 + the answer
    num_beams: int = 1  # 1: greedy
    batch_size: int = 16  # prompts decoded at once (greedy; left-padded, same answers as one at a time)
    processes: int = 1  # > 1: generate in that many processes (torchrun; one GPU each on CUDA), then score
    max_tiles: int = 0  # dynamic tiling at evaluation (InternVL evaluates with 12); 0: model.max_tiles
    compare_base: bool = True  # run the same benchmarks with the base model (text only)
    base_refer: bool = False  # ask the base the referring prompts too (no [SEG]: its masks are empty anyway)
    report_samples: int = 2  # pictures of right and of wrong samples per benchmark
    depth_pairs: int = 2000  # random pixel pairs per map for the pair-order accuracy
    bootstrap: int = 1000  # bootstrap resamples for the cIoU/gIoU intervals and the differences to the base

    def __post_init__(self) -> None:
        for name in ("refer_limit", "hardblink_limit", "mcq_limit", "mme_limit", "unconstrained_limit",
                     "report_samples"):
            if getattr(self, name) < 0:
                raise ConfigError(f"evaluate.{name} must be >= 0 (0: all), got {getattr(self, name)}")
        if "train" in self.refer_splits:
            raise ConfigError("evaluate.refer_splits must not contain 'train'")
        if min(self.max_new_tokens, self.num_beams, self.depth_pairs, self.batch_size, self.bootstrap,
               self.processes) < 1:
            raise ConfigError("evaluate.max_new_tokens, num_beams, depth_pairs, batch_size, bootstrap and processes "
                              "must be >= 1")
        if not 0 <= self.max_tiles <= 40:
            raise ConfigError(f"evaluate.max_tiles must be in 0..40 (0: model.max_tiles), got {self.max_tiles}")


@dataclass
class PerceptioConfig:
    """The whole resolved configuration of a run."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    vqvae: VQVAEConfig = field(default_factory=VQVAEConfig)
    curate: CurateConfig = field(default_factory=CurateConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    base: BaseFitConfig = field(default_factory=BaseFitConfig)
    sam2_fit: Sam2FitConfig = field(default_factory=Sam2FitConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def section(self, dotted: str) -> Any:
        obj: Any = self
        for part in dotted.split("."):
            obj = getattr(obj, part)
        return obj


# --------------------------------------------------------------------------------------------
# Loading, overriding, dumping
# --------------------------------------------------------------------------------------------

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_PROFILE = "tiny"


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain dicts/lists (derived ``init=False`` fields included)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def canonical_json(obj: Any) -> str:
    """Stable JSON text of a config (sub)tree, for digests."""
    return json.dumps(to_dict(obj), sort_keys=True, separators=(",", ":"))


def _check_value(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` coerced to ``tp`` where that is lossless (int -> float), else raise."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list ({_type_name(tp)}), got {value!r}")
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        out = [_check_value(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return out if origin is list else tuple(out)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        kt, vt = (typing.get_args(tp) + (Any, Any))[:2]
        return {_check_value(k, kt, key): _check_value(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected a boolean, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp!r}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """Build dataclass ``cls`` from ``data``, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = prefix or "top level"
        raise ConfigError(
            f"unknown config key {prefix + '.' if prefix else ''}{unknown[0]!s} "
            f"(known in {where}: {', '.join(sorted(fields))})"
        )
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        tp = hints[name]
        key = f"{prefix}.{name}" if prefix else name
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{key} is a section: give its fields ({key}.<field>=...), not {value!r}")
            base = to_dict(tp())
            merged = _deep_merge(base, value, key)
            kwargs[name] = _build(tp, _strip_derived(tp, merged), key)
        else:
            kwargs[name] = _check_value(value, tp, key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # e.g. a __post_init__ check
        raise ConfigError(f"{prefix or 'config'}: {e}") from e


def _strip_derived(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    derived = {f.name for f in dataclasses.fields(cls) if not f.init}
    return {k: v for k, v in data.items() if k not in derived}


def _deep_merge(base: dict[str, Any], upd: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = dict(base)
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v, f"{prefix}.{k}" if prefix else k)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"vqvae.steps=10"`` -> (["vqvae", "steps"], 10). The value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from e
    return key.split("."), value


def profile_names() -> list[str]:
    """The profiles of ``configs/`` (``tiny``, ``smoke``, ...), sorted."""
    return sorted(x.stem for x in CONFIG_DIR.glob("*.yaml"))


def is_profile_path(profile: str | Path) -> bool:
    """Whether ``--config`` names a file rather than a profile: a :class:`~pathlib.Path`, or text
    with a ``/`` or ending in ``.yaml``/``.yml``. Anything else is a profile name of ``configs/``,
    whatever the current folder holds (a folder ``smoke/`` there does not shadow the profile)."""
    if isinstance(profile, Path):
        return True
    return "/" in profile or profile.endswith((".yaml", ".yml")) or os.sep in profile


def resolve_profile(profile: str | Path | None) -> Path:
    """A profile name (``tiny``: ``configs/tiny.yaml``) or a YAML path (:func:`is_profile_path`) ->
    the file's path; ``None`` is :data:`DEFAULT_PROFILE`. A path that is not a file, or an unknown
    name, is a :class:`ConfigError` (the latter listing the profiles)."""
    if profile is None:
        profile = DEFAULT_PROFILE
    if is_profile_path(profile):
        p = Path(profile).expanduser()
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}" if not p.exists() else f"config {p} is not a file")
        return p
    cand = CONFIG_DIR / f"{profile}.yaml"
    if not cand.is_file():
        hint = " (a YAML file is named with a / or a .yaml suffix: ./NAME.yaml)" if Path(profile).exists() else ""
        raise ConfigError(f"unknown profile {profile!r} (profiles: {', '.join(profile_names())}){hint}")
    return cand


WORKDIR_RECORD = "perceptio-workdir.json"
"""The file in a workdir naming the profile and overrides its last run was made with
(:func:`remember_profile`), read by the commands given the workdir alone (:func:`remembered_profile`)."""


def profile_ref(profile: str | Path | None) -> str:
    """How a workdir records ``profile``: a profile name as it is, a YAML file as its absolute path
    (so the record reads the same from any folder). Raises :class:`ConfigError` as
    :func:`resolve_profile`."""
    path = resolve_profile(profile)
    return str(path.resolve()) if is_profile_path(profile or DEFAULT_PROFILE) else str(profile or DEFAULT_PROFILE)


def remember_profile(workdir: str | Path, profile: str | Path | None, overrides: list[str] | tuple[str, ...],
                     **extra: Any) -> Path:
    """Write ``<workdir>/perceptio-workdir.json`` (atomically): ``profile`` (:func:`profile_ref`),
    ``overrides`` as given (``run.workdir`` left out: the record's own folder is the workdir) and
    ``extra`` (run id, command). Returns the file's path."""
    from perceptio_core.atomic_io import write_json

    ov = [o for o in overrides if not o.replace(" ", "").startswith("run.workdir=")]
    path = Path(workdir).expanduser().resolve() / WORKDIR_RECORD
    write_json(path, {"profile": profile_ref(profile), "overrides": ov, **extra}, sort_keys=False)
    return path


def remembered_profile(workdir: str | Path) -> tuple[str, list[str]] | None:
    """``(profile, overrides)`` recorded in ``workdir`` by its last run (:func:`remember_profile`),
    None when it has no record. A record that does not read as one is a :class:`ConfigError`
    naming the file."""
    path = Path(workdir).expanduser() / WORKDIR_RECORD
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
        profile, overrides = rec["profile"], rec["overrides"]
        if not isinstance(profile, str) or not isinstance(overrides, list) or \
                not all(isinstance(o, str) for o in overrides):
            raise TypeError("profile must be text and overrides a list of text")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} does not read as a workdir record ({type(e).__name__}: {e}); give --config "
                          "(a run writes it again)") from e
    return profile, list(overrides)


def load_config(
    profile: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> PerceptioConfig:
    """Load a YAML profile (name or path), apply ``section.key=value`` overrides, check everything."""
    path = resolve_profile(profile)
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a profile must be a mapping of sections")
    data = _deep_merge(to_dict(PerceptioConfig()), data)
    for ov in overrides:
        keys, value = parse_override(ov)
        node = data
        for i, k in enumerate(keys[:-1]):
            if not isinstance(node.get(k), dict):
                raise ConfigError(f"unknown config key {'.'.join(keys[: i + 1])} (in override {ov!r})")
            node = node[k]
        if keys[-1] not in node and not _is_mapping_field(keys[:-1]):
            raise ConfigError(f"unknown config key {'.'.join(keys)} (in override {ov!r})")
        node[keys[-1]] = value
    # derived fields are recomputed, never read back
    return _build(PerceptioConfig, _strip_all_derived(PerceptioConfig, data), "")


def _is_mapping_field(keys: list[str]) -> bool:
    """Whether the dotted ``keys`` name a ``dict`` field (``data.mcq``): one whose keys are free, so
    ``--set data.mcq.seedbench=...`` adds an entry."""
    tp: Any = PerceptioConfig
    for k in keys:
        if not dataclasses.is_dataclass(tp):
            return False
        tp = typing.get_type_hints(tp).get(k)
        if tp is None:
            return False
    return typing.get_origin(tp) is dict


def _strip_all_derived(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    out = _strip_derived(cls, data)
    for k, v in list(out.items()):
        tp = hints.get(k)
        if tp is not None and dataclasses.is_dataclass(tp) and isinstance(v, dict):
            out[k] = _strip_all_derived(tp, v)
    return out


def dump_config(cfg: PerceptioConfig) -> str:
    """The resolved config as YAML (what every run writes beside its artifacts)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
