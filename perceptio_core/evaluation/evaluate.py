"""Evaluation of a Perceptio model on the SPEC §6 benchmarks, against its base, with a report.

Every evaluator takes a *predict* callable ``predict(image, prompt) -> prediction``, where ``image``
is a path (or a PIL image) and the prediction has ``.text`` (the answer, perception tokens removed),
``.mask`` ([H, W] bool or None), ``.depth_map`` ([h, w] float or None) and ``.depth_indices`` (list or
None); ``.status`` (a :class:`~perceptio_core.format.target.ParseStatus` or its string) and
``.raw_text`` are read when present. :func:`model_predictor` wraps
:func:`perceptio_core.model.generation.generate` of a loaded Perceptio model that way; :func:`base_predictor`
wraps a plain InternVL (the base, text only); tests pass fakes.

Benchmarks and the metric names of :func:`run_evaluation` (``<benchmark>.<split>.<metric>``; the
``evaluate`` stage adds the ``evaluate.`` prefix; the base model's metrics start with ``base.``):

- Referring segmentation (``refcoco``, ``refcoco+``, ``refcocog``), every split present except train,
  in the order val, testA, testB, test: ``<dataset>.<split>.{ciou, giou, p50, n}``
  (:mod:`perceptio_core.evaluation.metrics`). Prompt: ``render_prompt("refer_seg", variant=0, expr=...)``, the
  canonical training template, with the expression cleaned as curation cleans it. Ground truth:
  :func:`perceptio_core.data.refer.ann_to_mask` at the image's size; the predicted mask is resized to it
  (nearest). No mask (no ``[SEG]``) counts as an empty mask. One expression per prompt (a one-round
  question, although training conversations hold several rounds): the prediction's ``mask`` is the
  first ``[SEG]``'s (``GenerationResult.masks[0]``); further ``[SEG]`` a model emits are not scored.
- HardBLINK: ``hardblink.<n>.accuracy`` for each point count n present (3, 4, 5), and
  ``hardblink.mean.accuracy``, the mean of the per-count accuracies (as the paper reports).
  Prompt: ``render_prompt("depth_cot", variant=0, question=record.question)``; answers read by
  :func:`perceptio_core.evaluation.answers.parse_choice` against the record's options (the letters its
  question text offers: the public texts list them); unreadable = wrong. ``hardblink.<n>.token_depth``
  (and ``hardblink.mean.token_depth``): the share answered right by reading the *decoded depth map*
  at the marked points (largest disparity = nearest; no map = wrong): whether the depth tokens
  knew, whatever the text said. It needs the points' coordinates, which only the synthetic world
  provides (its ``points/`` file; the public release has the points drawn on the images only):
  without them it is left out and :attr:`Evaluation.notes` says so,
  ``hardblink.depth_tokens.skipped: "no point coordinates in the public release"``; over a point
  count where only some questions have points it covers those, and the notes say how many.
- Multiple-choice benchmarks (``data.mcq``: MMBench, SEED-Bench, AI2D, ...; rows of a ``train``
  split left out): ``mcq.<name>.{accuracy, n}`` and per category of the TSV
  ``mcq.<name>.category.<category>.{accuracy, n}`` (the category lower-cased, every run of other
  characters than letters and digits one ``_``). Prompt :func:`mcq_prompt` (hint, question, the
  options, VLMEvalKit's instruction); answers read by
  :func:`perceptio_core.evaluation.answers.parse_mc_answer`; unreadable = wrong. Plain accuracy, one
  pass per question (VLMEvalKit's official MMBench figure is its circular evaluation).
- MME: ``mme.<subtask>.{acc, acc_plus, score, n}`` and ``mme.perception.score``,
  ``mme.cognition.score`` (the sums of the subtasks present:
  :func:`perceptio_core.evaluation.metrics.mme_scores`). Prompt: the question as MME writes it
  (it ends "Please answer yes or no."); answers read as MME's script reads them
  (:func:`perceptio_core.evaluation.answers.parse_yes_no`); unreadable = wrong.
- Perception block (SPEC §1): ``perception_block.wellformed``: the share of the refer and HardBLINK
  generations (the prompts that ask for it) whose perception output is well formed: status ``ok``
  of :func:`~perceptio_core.format.target.parse_generation` (``[SEG]`` + a block of exactly N
  codes for refer; the block for HardBLINK's depth-only target, where ``no_seg`` is fine);
  ``perception_block.wellformed_unconstrained``: the same with a second predictor that decodes
  without the constraint, on the first ``unconstrained_limit`` of those prompts (spread evenly).
- Depth quality of the depth map decoded from the generated tokens, over the refer and HardBLINK
  generations: ``depth.teacher.{mse, absrel, delta1, pair_order, coverage, n}`` against the teacher
  map of the image (looked up by image digest; :func:`perceptio_core.depth.metrics.map_metrics`
  and pair order on ``1 / (map + eps)``), ``depth.true.{absrel, delta1, pair_order, coverage, n}``
  against the true depth where the record has one
  (:func:`perceptio_core.depth.metrics.teacher_vs_true_metrics`: scale/shift-aligned disparity), and
  ``depth.teacher_on_true.{absrel, delta1, pair_order}``: the teacher map itself against the true
  depth, the ceiling the tokens distil. Honest counting: a generation without a well-formed block
  is scored as a flat map (constant 0.5), never dropped; ``coverage`` is the share that had a map.

Limits (:class:`~perceptio_core.config.EvaluateConfig`): ``refer_limit`` expressions per dataset
and split, ``hardblink_limit`` questions per point count, ``mcq_limit`` questions per benchmark,
``mme_limit`` images per MME subtask (both questions of each),
``unconstrained_limit`` prompts; 0 = all. A limited subset is spread evenly over the records in
their (sorted) order, so it is the same on every run.

Honest counting and statistics: an unreadable answer is wrong and counted (``<...>.invalid``: the
share no option / yes / no could be read from; ``<dataset>.<split>.no_mask``: referring answers
without ``[SEG]``); HardBLINK and each multiple-choice set carry their ``chance`` and ``majority``
baselines; :attr:`Evaluation.intervals` holds every accuracy's Wilson interval and cIoU / gIoU's
bootstrap ones, :attr:`Evaluation.differences` the paired difference to the base
(:mod:`perceptio_core.evaluation.stats`). The base is not asked the referring prompts unless
``base_refer``: it has no ``[SEG]``, so its masks are empty (scored so, with a note).

Throughput and resumption: predictors with a ``batch`` method (:func:`model_predictor`,
:func:`base_predictor` when greedy) decode ``batch_size`` prompts at once, with the answers of one
at a time; with a prediction cache every batch is kept as it is done, what the cache holds is not
generated again, and several processes share the work (``world``, ``barrier``).

:func:`run_evaluation` returns an :class:`Evaluation` (metrics, per-sample scores, intervals,
differences, the samples kept for pictures, block status counts, timings);
:func:`~perceptio_core.evaluation.report.write_report` writes ``report.md`` and its PNGs.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np

from perceptio_core.evaluation.answers import label_of, parse_choice, parse_mc_answer, parse_yes_no
from perceptio_core.config import EvaluateConfig
from perceptio_core.device import ProgressFn
from perceptio_core.depth.codec import DepthCodecSpec
from perceptio_core.depth.metrics import MAP_EPS, map_metrics, pair_order_accuracy, resize_map, teacher_vs_true_metrics
from perceptio_core.data.image_io import ImageError, image_digest, load_image
from perceptio_core.evaluation.predictions import PredictionCache, prediction_key, shard
from perceptio_core.evaluation.metrics import IoUAccumulator, intersection_union, mme_scores, resize_mask
from perceptio_core.evaluation.stats import (
    Estimate,
    bootstrap_iou,
    chance_baseline,
    majority_baseline,
    paired_difference,
    paired_iou_difference,
    proportion,
)
from perceptio_core.format.target import ParseStatus, parse_generation
from perceptio_core.format.prompts import clean_expression, format_mc_prompt, render_prompt
from perceptio_core.data.mme import group_of
from perceptio_core.data.records import HardBlinkRecord, ImageRecord, McqRecord, MmeRecord, RefRecord, Sources
from perceptio_core.data.refer import ann_to_mask

Predict = Callable[[Any, str], Any]

PERCEPTIO, BASE = "perceptio", "base"
NO_POINTS = "no point coordinates in the public release"  # why hardblink.*.token_depth is left out
FLAT_MAP_VALUE = 0.5  # the map a generation without a well-formed block is scored as


# --------------------------------------------------------------------------------------------
# Prompts (the training templates)
# --------------------------------------------------------------------------------------------


def refer_prompt(sentence: str) -> str:
    """The referring-segmentation prompt: the canonical ``refer_seg`` training template."""
    return render_prompt("refer_seg", variant=0, expr=clean_expression(sentence))


def hardblink_prompt(question: str) -> str:
    """The HardBLINK prompt: the canonical ``depth_cot`` training template around the record's
    question (the depth chain-of-thought samples are trained the same way)."""
    return render_prompt("depth_cot", variant=0, question=question.strip())


def mcq_prompt(record: McqRecord) -> str:
    """:func:`format_mc_prompt` of a :class:`McqRecord`."""
    return format_mc_prompt(record.question, record.options, record.hint)


def mme_prompt(record: MmeRecord) -> str:
    """MME's question as written (it carries its own "Please answer yes or no.")."""
    return record.question


# --------------------------------------------------------------------------------------------
# Predictors
# --------------------------------------------------------------------------------------------


def _image_arg(image: Any) -> Any:
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    return image


def model_predictor(
    model: Any,
    *,
    constrained: bool = True,
    max_new_tokens: int = 160,
    num_beams: int = 1,
    want_mask: bool = True,
    want_depth: bool = True,
    max_tiles: int | None = None,
) -> Predict:
    """``predict(image path or PIL, prompt) -> GenerationResult`` for a loaded
    :class:`~perceptio_core.model.perceptio_model.PerceptioModel` (its own tokenizer), through
    :func:`perceptio_core.model.generation.generate`; images tiled up to ``max_tiles`` (None or 0:
    the model's ``model.max_tiles``). With greedy decoding it has ``predict.batch(images, prompts)``
    (:func:`~perceptio_core.model.generation.generate_batch`: the same results, several at once)."""
    from perceptio_core.model.generation import generate, generate_batch

    def predict(image: Any, prompt: str) -> Any:
        return generate(model, model.tokenizer, _image_arg(image), prompt, max_new_tokens, constrained,
                        num_beams, want_mask=want_mask, want_depth=want_depth,
                        max_tiles=max_tiles or None)  # fmt: skip

    def batch(images: Sequence[Any], prompts: Sequence[str]) -> list[Any]:
        return generate_batch(model, model.tokenizer, [_image_arg(im) for im in images], prompts, max_new_tokens,
                              constrained, want_mask=want_mask, want_depth=want_depth,
                              max_tiles=max_tiles or None)  # fmt: skip

    if num_beams == 1:
        predict.batch = batch  # type: ignore[attr-defined]
    return predict


class TextOnlyLM:
    """A plain InternVL (``InternVLForConditionalGeneration``: the base, no perception tokens) with
    the ``lm_forward`` interface :func:`perceptio_core.model.generation.generate_ids` decodes with."""

    def __init__(self, vlm: Any) -> None:
        self.vlm = vlm

    def lm_forward(self, input_ids: Any, attention_mask: Any = None, pixel_values: Any = None,
                   past_key_values: Any = None, use_cache: bool = False, logits_from: int | None = -1,
                   position_ids: Any = None) -> Any:
        from perceptio_core.model.internvl import lm_pass

        hidden, logits, cache = lm_pass(self.vlm, input_ids, attention_mask, pixel_values, past_key_values,
                                        use_cache, logits_from, position_ids)  # fmt: skip
        return SimpleNamespace(hidden=hidden, logits=logits, past_key_values=cache)


def base_predictor(base_model: Any, tokenizer: Any, depth_spec: DepthCodecSpec, *, max_new_tokens: int = 160,
                   num_beams: int = 1, processor: Any = None) -> Predict:
    """``predict(image, prompt)`` for the base InternVL (text only): the prompt encoded as in
    training (:func:`perceptio_core.model.batching.encode_prompt`), greedy (or beam) decoding with the KV
    cache, no constraint. Its text is read by the parser the Perceptio model's is, with the K and N
    of ``depth_spec`` (the compared model's codec), so both answers are cut out the same way. The
    prediction has ``mask``, ``depth_map`` and ``depth_indices`` None. Greedy, it has
    ``predict.batch(images, prompts)`` too (one left-padded batch, the same answers)."""
    import torch

    from perceptio_core.model.batching import encode_image, encode_prompt
    from perceptio_core.model.generation import generate_ids, generate_ids_batch, pad_token_id
    from perceptio_core.model.internvl import stop_token_ids
    from perceptio_core.model.processor import TileProcessor

    lm = TextOnlyLM(base_model)
    processor = processor or TileProcessor.for_model(base_model.config)
    stops = stop_token_ids(base_model, tokenizer)

    @torch.no_grad()
    def predict(image: Any, prompt: str) -> Any:
        base_model.eval()
        param = next(base_model.parameters())
        _, tiles = encode_image(processor, _image_arg(image))
        px = tiles.to(device=param.device, dtype=param.dtype)
        prompt_ids = encode_prompt(tokenizer, prompt, processor.tokens_per_tile * len(tiles))
        ids, _ = generate_ids(lm, prompt_ids, px, max_new_tokens, stops, num_beams=num_beams)
        return answer(ids)

    def answer(ids: list[int]) -> Any:
        ids = [t for t in ids if t not in stops]
        raw = tokenizer.decode(ids, skip_special_tokens=False)
        parsed = parse_generation(raw, depth_spec.num_tokens, depth_spec.codebook_size)
        return SimpleNamespace(text=parsed.answer, raw_text=raw, token_ids=ids, status=parsed.status,
                               mask=None, depth_map=None, depth_indices=None)  # fmt: skip

    @torch.no_grad()
    def batch(images: Sequence[Any], prompts: Sequence[str]) -> list[Any]:
        base_model.eval()
        param = next(base_model.parameters())
        tiles = [encode_image(processor, _image_arg(im))[1] for im in images]
        prompt_ids = [encode_prompt(tokenizer, pr, processor.tokens_per_tile * len(t))
                      for pr, t in zip(prompts, tiles)]
        px = torch.cat(tiles).to(device=param.device, dtype=param.dtype)
        decoded = generate_ids_batch(lm, prompt_ids, px, max_new_tokens, stops, pad_token_id(tokenizer, stops))
        return [answer(ids) for ids, _ in decoded]

    if num_beams == 1:
        predict.batch = batch  # type: ignore[attr-defined]
    return predict


def load_predictors(
    model_dir: str | os.PathLike[str],
    cfg: EvaluateConfig,
    base_dir: str | os.PathLike[str] | None = None,
    base_tokenizer: str | None = None,
    device: str = "cpu",
) -> tuple[Any, dict[str, Predict | None]]:
    """``(model, predictors)``: the fine-tuned Perceptio model of ``model_dir`` on ``device`` and
    :func:`make_predictors` of it, with the base InternVL of ``base_dir`` (None: no base) on the
    same device in the model's dtype, so the comparison costs what the model's does; its tokenizer
    from ``base_tokenizer`` (None: the base's own). What the ``evaluate`` stage and its
    data-parallel workers load alike."""
    from perceptio_core.evaluation.infer import load_model
    from perceptio_core.model.internvl import load_internvl, load_tokenizer

    model = load_model(model_dir, device=device)
    base_model = base_tok = None
    if base_dir is not None:
        base_model = load_internvl(str(base_dir)).to(device=device, dtype=model.base_model.dtype)
        base_tok = load_tokenizer(str(base_tokenizer or base_dir))
    return model, make_predictors(model, cfg, base_model=base_model, base_tokenizer=base_tok)


def make_predictors(
    model: Any,
    cfg: EvaluateConfig | None = None,
    base_model: Any = None,
    base_tokenizer: Any = None,
) -> dict[str, Predict | None]:
    """The predictors :func:`run_evaluation` takes, from a loaded Perceptio ``model`` and
    ``cfg``: ``{"predict", "predict_unconstrained", "base_predict"}`` (keyword arguments of
    :func:`run_evaluation`). ``predict`` decodes with ``cfg.constrained``; ``predict_unconstrained``
    without the constraint (None when ``unconstrained_limit`` is 0); ``base_predict`` wraps
    ``base_model`` (None without one or when ``cfg.compare_base`` is off). K and N are the model's
    (``model.depth_spec``); ``cfg.max_new_tokens`` must hold its perception block ([SEG], the two
    markers and N codes), else ``ValueError``. Images are tiled up to ``cfg.max_tiles`` (0: the
    model's ``model.max_tiles``), the base's alike."""
    from perceptio_core.model.processor import TileProcessor

    cfg = cfg or EvaluateConfig()
    spec = model.depth_spec
    block = spec.num_tokens + 3
    if cfg.max_new_tokens <= block:
        raise ValueError(f"evaluate.max_new_tokens = {cfg.max_new_tokens} leaves no room for an answer after the "
                         f"perception block of this model ({block} tokens: [SEG], 2 markers, N = {spec.num_tokens})")
    tiles = cfg.max_tiles or model.image_processor.max_tiles
    kw = dict(max_new_tokens=cfg.max_new_tokens, num_beams=cfg.num_beams)
    return {
        "predict": model_predictor(model, constrained=cfg.constrained, max_tiles=tiles, **kw),
        "predict_unconstrained": (
            model_predictor(model, constrained=False, want_mask=False, want_depth=False, max_tiles=tiles, **kw)
            if cfg.unconstrained_limit > 0 else None
        ),
        "base_predict": (
            base_predictor(base_model, base_tokenizer, spec,
                           processor=TileProcessor.for_model(base_model.config).with_max_tiles(tiles), **kw)
            if base_model is not None and cfg.compare_base else None
        ),
    }


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class Shown:
    """One sample kept for the report's pictures (the perceptio prediction; the base's answer to
    the same prompt when the base ran)."""

    benchmark: str  # "refer", "hardblink", "mcq", "mme"
    name: str  # "refcoco val", "hardblink 3", "mcq mmbench", "mme count"
    key: str
    image_path: str
    query: str  # what the sample asks (expression, question)
    prompt: str
    answer: str  # the predicted text
    reference: str  # the right answer (or the object's category for refer)
    correct: bool
    score: float | None = None  # IoU for refer
    mask: np.ndarray | None = None
    gt_mask: np.ndarray | None = None
    depth_map: np.ndarray | None = None
    status: str = ""
    points: tuple[tuple[float, float], ...] = ()  # HardBLINK's marked points (x, y) and labels
    labels: tuple[str, ...] = ()
    base_answer: str | None = None
    base_correct: bool | None = None
    figure: str = ""  # PNG file name, once written


@dataclass
class Evaluation:
    """What :func:`run_evaluation` returns.

    metrics: flat ``<benchmark>.<split>.<metric>`` -> value (``base.`` for the base model).
    samples: metric name -> its per-sample scores (0/1 for an accuracy; ``(intersection, union)``
    pixel counts for a split's ``iou``), the base's under ``base.``, in the same sample order.
    intervals: metric name -> its 95% interval (:class:`~perceptio_core.evaluation.stats.Estimate`:
    Wilson for accuracies, the bootstrap over expressions for cIoU and gIoU).
    differences: metric name -> Perceptio minus the base on the same samples, with its paired
    bootstrap interval (:func:`~perceptio_core.evaluation.stats.within_noise` when it holds 0).
    notes: metric name -> why it is missing or partial (``hardblink.depth_tokens.skipped``).
    shown: the samples kept for pictures. block_status: per "constrained"/"unconstrained", counts of
    each :class:`ParseStatus`. timings: seconds and samples per second per model. errors: samples
    whose image could not be read (scored wrong / empty, never dropped).
    """

    metrics: dict[str, float] = field(default_factory=dict)
    samples: dict[str, list[Any]] = field(default_factory=dict)
    intervals: dict[str, Estimate] = field(default_factory=dict)
    differences: dict[str, Estimate] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    shown: list[Shown] = field(default_factory=list)
    block_status: dict[str, dict[str, int]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


_EMPTY = SimpleNamespace(text="", raw_text="", mask=None, depth_map=None, depth_indices=None,
                         status=ParseStatus.NO_BLOCK)  # fmt: skip


class _Runner:
    """Calls a predictor, counts progress, turns an unreadable image into an empty prediction.

    :meth:`many` hands ``batch_size`` pairs at a time to a predictor's ``batch`` when it has one.
    With a :class:`~perceptio_core.evaluation.predictions.PredictionCache` process ``rank`` of
    ``world`` owns a fixed share of the distinct pairs (every ``world``-th, from ``rank``) and
    generates the part of it the cache lacks, writes each batch to the cache as it is done, waits
    for the other processes (``barrier``) and returns every prediction from the cache: a cut
    evaluation resumes, and one process or several give the same answers."""

    def __init__(self, total: int, progress: ProgressFn | None, errors: list[str], batch_size: int = 1,
                 cache: PredictionCache | None = None, tags: dict[str, str] | None = None,
                 world: tuple[int, int] = (0, 1), barrier: Callable[[], None] | None = None) -> None:
        self.total, self.done, self.progress, self.errors = total, 0, progress, errors
        self.batch_size = max(1, int(batch_size))
        self.cache, self.tags = cache, dict(tags or {})
        self.rank, self.world = world
        self.barrier = barrier
        self.calls: Counter[str] = Counter()
        self.seconds: Counter[str] = Counter()
        self.cached: Counter[str] = Counter()

    def _tick(self, model: str, n: int, info: dict[str, Any]) -> None:
        for _ in range(n):
            self.done += 1
            if self.progress is not None:
                self.progress(self.done, self.total, {"model": model, **info})

    def _generate(self, predict: Predict, model: str, pairs: Sequence[tuple[str, str]],
                  info: dict[str, Any]) -> list[Any]:
        batch = getattr(predict, "batch", None)
        if batch is None or self.batch_size == 1 or len(pairs) == 1:
            return [self(predict, model, image, prompt, **info) for image, prompt in pairs]
        t0 = time.perf_counter()
        try:
            preds = batch([image for image, _ in pairs], [prompt for _, prompt in pairs])
        except ImageError:  # only the unreadable pair is scored empty
            return [self(predict, model, image, prompt, **info) for image, prompt in pairs]
        self.seconds[model] += time.perf_counter() - t0
        self.calls[model] += len(pairs)
        self._tick(model, len(pairs), info)
        return list(preds)

    def many(self, predict: Predict, model: str, pairs: Sequence[tuple[str, str]], **info: Any) -> list[Any]:
        """The predictions of ``(image, prompt)`` pairs, in order (class docstring)."""
        if self.cache is None:
            out: list[Any] = []
            for start in range(0, len(pairs), self.batch_size):
                out += self._generate(predict, model, pairs[start:start + self.batch_size], info)
            return out
        tag = self.tags.get(model, model)
        keys = [prediction_key(tag, image, prompt) for image, prompt in pairs]
        first: dict[str, int] = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        todo = [i for k, i in first.items() if k not in self.cache]
        # each process owns a fixed share of the pairs (not of what it sees missing: another may
        # already have written part of the next benchmark), and generates the part it lacks
        mine = [i for i in shard(list(first.values()), self.rank, self.world) if keys[i] not in self.cache]
        self.cached[model] += len(pairs) - len(todo)
        self._tick(model, len(pairs) - len(todo), info)
        mine_set = set(mine)
        for start in range(0, len(mine), self.batch_size):
            idx = mine[start:start + self.batch_size]
            preds = self._generate(predict, model, [pairs[i] for i in idx], info)
            self.cache.put([(keys[i], p) for i, p in zip(idx, preds)])
        if self.world > 1:
            if self.barrier is not None:
                self.barrier()
            self.cache.refresh()
        out = [self.cache.get(k) for k in keys]
        self._tick(model, max(len(todo) - len(mine), 0), info)  # what the other processes generated
        self.errors += [f"{model}: {p.error}" for i, p in enumerate(out) if p.error and i not in mine_set]
        return out

    def __call__(self, predict: Predict, model: str, image: str, prompt: str, **info: Any) -> Any:
        t0 = time.perf_counter()
        try:
            pred = predict(image, prompt)
        except ImageError as e:
            self.errors.append(f"{model}: {e}")
            pred = SimpleNamespace(**vars(_EMPTY), error=str(e))
        self.seconds[model] += time.perf_counter() - t0
        self.calls[model] += 1
        self._tick(model, 1, info)
        return pred


def spread(items: Sequence[Any], limit: int | None) -> list[Any]:
    """``limit`` items spread evenly over ``items`` (order kept); all of them when ``limit`` is
    None, 0 or not smaller than ``len(items)``."""
    n = len(items)
    if not limit or limit >= n:
        return list(items)
    return [items[(i * n) // limit] for i in range(limit)]


# --------------------------------------------------------------------------------------------
# Plans: which records each benchmark evaluates
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ReferItem:
    dataset: str
    split: str
    record: RefRecord
    image: ImageRecord


def refer_plan(sources: Sources, cfg: EvaluateConfig) -> dict[tuple[str, str], list[_ReferItem]]:
    """(dataset, split) -> the refer items evaluated, for the datasets of ``cfg.refer_datasets`` (None:
    every dataset of the records, in their order) and the splits of ``cfg.refer_splits`` present in
    the records (never ``train``), in that order."""
    out: dict[tuple[str, str], list[_ReferItem]] = {}
    datasets = cfg.refer_datasets
    if datasets is None:
        datasets = list(dict.fromkeys(r.dataset for r in sources.refs))
    for ds in datasets:
        for split in cfg.refer_splits:
            if split == "train":
                continue
            recs = sorted((r for r in sources.refs if r.dataset == ds and r.split == split),
                          key=lambda r: (r.ref_id, r.sent_id))  # fmt: skip
            items = [_ReferItem(ds, split, r, sources.coco_images[r.image_id])
                     for r in recs if r.image_id in sources.coco_images]  # fmt: skip
            if items:
                out[(ds, split)] = spread(items, cfg.refer_limit)
    return out


def hardblink_plan(records: Iterable[HardBlinkRecord], cfg: EvaluateConfig) -> dict[int, list[HardBlinkRecord]]:
    """Point count -> the HardBLINK records evaluated (sorted by qid, ``hardblink_limit`` each;
    records of a ``train`` split are left out)."""
    by_n: dict[int, list[HardBlinkRecord]] = {}
    for r in sorted(records, key=lambda r: (r.n_points, r.qid)):
        if r.split == "train":
            continue
        by_n.setdefault(r.n_points, []).append(r)
    return {n: spread(rs, cfg.hardblink_limit) for n, rs in sorted(by_n.items())}


def _qid_order(qid: str) -> tuple[int, str]:
    return (int(qid), "") if qid.isdigit() else (1 << 62, qid)


def mcq_plan(records: Iterable[McqRecord], cfg: EvaluateConfig) -> dict[str, list[McqRecord]]:
    """Benchmark name -> its records evaluated (in index order, ``mcq_limit`` each); rows of a
    ``train`` split (the world's questions its base is fitted on) are never evaluated."""
    by_name: dict[str, list[McqRecord]] = {}
    for r in sorted(records, key=lambda r: (r.benchmark, _qid_order(r.qid))):
        if r.split != "train":
            by_name.setdefault(r.benchmark, []).append(r)
    return {name: spread(rs, cfg.mcq_limit) for name, rs in by_name.items()}


def mme_plan(records: Iterable[MmeRecord], cfg: EvaluateConfig) -> dict[str, list[MmeRecord]]:
    """Subtask -> its questions evaluated: ``mme_limit`` images spread over each subtask's sorted
    images, every question of each (acc+ needs both)."""
    by_task: dict[str, dict[str, list[MmeRecord]]] = {}
    for r in sorted(records, key=lambda r: (r.subtask, r.image_key, r.qid)):
        by_task.setdefault(r.subtask, {}).setdefault(r.image_key, []).append(r)
    return {task: [r for key in spread(sorted(images), cfg.mme_limit) for r in images[key]]
            for task, images in by_task.items()}


def category_key(category: str) -> str:
    """A TSV category as a metric name part: lower case, every other run of characters one ``_``."""
    return "_".join("".join(c if c.isalnum() else " " for c in category.lower()).split()) or "none"


# --------------------------------------------------------------------------------------------
# Depth quality
# --------------------------------------------------------------------------------------------


def _lookup(store: Any, digest: str) -> np.ndarray | None:
    """``store[digest]`` for a dict, a ``DepthMaps`` or any mapping; None when absent."""
    if store is None or not digest or digest not in store:
        return None
    v = store.get(digest) if hasattr(store, "get") else store[digest]
    return None if v is None else np.asarray(v, dtype=np.float32)


class DepthQuality:
    """Accumulates the depth metrics of decoded maps (module docstring, "Depth quality")."""

    def __init__(self, n_pairs: int = 2000) -> None:
        self.n_pairs = n_pairs
        self.rows: dict[str, list[dict[str, float]]] = {"teacher": [], "true": [], "teacher_on_true": []}
        self.present: dict[str, int] = {"teacher": 0, "true": 0}

    def add(self, depth_map: np.ndarray | None, teacher: np.ndarray | None, true_depth: np.ndarray | None) -> None:
        """One generation: its decoded map (None: no well-formed block), the teacher's [0, 1] map
        of the image and the true depth (metres), either None when unknown."""
        has = depth_map is not None
        if teacher is not None:
            pred = self._as_map(depth_map, teacher.shape)
            m = map_metrics(pred, teacher)
            m["pair_order"] = pair_order_accuracy(pred, 1.0 / (np.clip(teacher, 0, 1) + MAP_EPS),
                                                  n_pairs=self.n_pairs, rng=0, pred_is_disparity=True)  # fmt: skip
            self.rows["teacher"].append(m)
            self.present["teacher"] += has
        if true_depth is not None:
            pred = self._as_map(depth_map, true_depth.shape)
            m = teacher_vs_true_metrics(pred, true_depth, n_pairs=self.n_pairs)
            self.rows["true"].append({k: m[k] for k in ("absrel", "delta1", "pair_order")})
            self.present["true"] += has
            if teacher is not None:
                t = teacher_vs_true_metrics(teacher, true_depth, n_pairs=self.n_pairs)
                self.rows["teacher_on_true"].append({k: t[k] for k in ("absrel", "delta1", "pair_order")})

    @staticmethod
    def _as_map(depth_map: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
        if depth_map is None:
            return np.full(shape, FLAT_MAP_VALUE, dtype=np.float32)
        return resize_map(np.asarray(depth_map, dtype=np.float32), tuple(shape))

    def result(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for ref, rows in self.rows.items():
            if not rows:
                continue
            for k in rows[0]:
                vals = [r[k] for r in rows if not math.isnan(r[k])]
                out[f"depth.{ref}.{k}"] = float(np.mean(vals)) if vals else math.nan
            if ref in self.present:
                out[f"depth.{ref}.coverage"] = self.present[ref] / len(rows)
                out[f"depth.{ref}.n"] = float(len(rows))
        return out


def _true_depth(path: str | None, cache: dict[str, np.ndarray]) -> np.ndarray | None:
    if not path:
        return None
    if path not in cache:
        try:
            cache[path] = np.load(path, allow_pickle=False).astype(np.float32)
        except (OSError, ValueError):
            return None
    return cache[path]


def token_depth_choice(depth_map: np.ndarray | None, points: Sequence[tuple[float, float]],
                       labels: Sequence[str], image_size: tuple[int, int]) -> str | None:
    """The label of the nearest marked point read off a decoded disparity map (largest value =
    nearest), the map resized to ``image_size = (H, W)``; None without a map."""
    if depth_map is None:
        return None
    h, w = image_size
    m = resize_map(np.asarray(depth_map, dtype=np.float32), (h, w))
    vals = [m[min(max(int(round(y)), 0), h - 1), min(max(int(round(x)), 0), w - 1)] for x, y in points]
    return labels[int(np.argmax(vals))]


# --------------------------------------------------------------------------------------------
# Block status
# --------------------------------------------------------------------------------------------


def block_status(pred: Any, expect_seg: bool, depth_spec: DepthCodecSpec) -> str:
    """The :class:`ParseStatus` value of a prediction's perception output for a task that expects
    ``[SEG]`` (refer) or not (HardBLINK's depth-only target): its ``raw_text`` parsed with the K and
    N of ``depth_spec``; a prediction without ``raw_text`` gives its ``status`` (``no_seg`` is ``ok``
    when no ``[SEG]`` is expected), and one without either is judged by ``depth_indices`` and
    ``mask``."""
    raw = getattr(pred, "raw_text", None)
    if raw is not None:
        return parse_generation(raw, depth_spec.num_tokens, depth_spec.codebook_size, expect_seg=expect_seg).status.value
    st = getattr(pred, "status", None)
    if st is not None:
        st = st.value if isinstance(st, ParseStatus) else str(st)
        return ParseStatus.OK.value if (st == ParseStatus.NO_SEG.value and not expect_seg) else st
    if getattr(pred, "depth_indices", None) is None:
        return ParseStatus.NO_BLOCK.value
    if expect_seg and getattr(pred, "mask", None) is None:
        return ParseStatus.NO_SEG.value
    return ParseStatus.OK.value


# --------------------------------------------------------------------------------------------
# The evaluation
# --------------------------------------------------------------------------------------------


class _Keeper:
    """Keeps the first ``k`` right and ``k`` wrong samples per benchmark name for the pictures."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.kept: dict[str, Shown] = {}
        self.count: Counter[tuple[str, bool]] = Counter()

    def wants(self, group: str, correct: bool) -> bool:
        return self.count[(group, correct)] < self.k

    def keep(self, group: str, s: Shown) -> None:
        self.count[(group, s.correct)] += 1
        self.kept[s.key] = s

    def base_answer(self, key: str, text: str, correct: bool) -> None:
        """The base's answer to a kept sample's prompt, shown beside the Perceptio model's."""
        if key in self.kept:
            self.kept[key].base_answer = text
            self.kept[key].base_correct = correct


def run_evaluation(
    predict: Predict,
    sources: Sources,
    cfg: EvaluateConfig | None = None,
    *,
    base_predict: Predict | None = None,
    predict_unconstrained: Predict | None = None,
    teacher_maps: Any = None,
    depth_spec: DepthCodecSpec,
    progress: ProgressFn | None = None,
    cache: PredictionCache | None = None,
    model_tags: dict[str, str] | None = None,
    world: tuple[int, int] = (0, 1),
    barrier: Callable[[], None] | None = None,
) -> Evaluation:
    """Run every benchmark of SPEC §6 on ``sources`` (module docstring).

    Args:
        predict: the Perceptio predictor (constrained decoding, the default).
        sources: the resolved records (refs + COCO images, HardBLINK, the MCQ benchmarks, MME).
        cfg: which datasets/splits and how many samples (:class:`EvaluateConfig`; default values).
        base_predict: the base model's predictor; its metrics come out as ``base.<...>``.
        predict_unconstrained: the Perceptio predictor without the decoding constraint, for
            ``perception_block.wellformed_unconstrained``.
        teacher_maps: image digest -> teacher [0, 1] map (a dict or a ``DepthMaps``), for
            ``depth.teacher.*``.
        depth_spec: the evaluated model's depth codec numbers (``model.depth_spec``): the N and K
            its generations are parsed with for the block status (:func:`block_status`).
        progress: ``progress(done, total, info)`` after every generation.
        cache: where predictions are kept (:class:`~perceptio_core.evaluation.predictions.PredictionCache`):
            those it holds are not generated again, and every metric is computed from it.
        model_tags: model name (``"perceptio"``, ``"base"``, ``"perceptio-unconstrained"``) -> the
            tag its cache keys start from (its weights' key and decoding settings); default the name.
        world: ``(rank, size)``: with a cache, this process generates every ``size``-th missing
            prediction from ``rank`` and reads the others' from the cache after ``barrier()``
            (data-parallel evaluation; every process computes the same metrics).
        barrier: waits for every process (``torch.distributed.barrier``); needed when ``size > 1``.
    """
    if world[1] > 1 and (cache is None or barrier is None):
        raise ValueError("data-parallel evaluation (world size > 1) needs a prediction cache and a barrier")
    cfg = cfg or EvaluateConfig()
    refer = refer_plan(sources, cfg) if cfg.refer else {}
    hardblink = hardblink_plan(sources.hardblink, cfg) if cfg.hardblink else {}
    mcq = mcq_plan(sources.mcq, cfg) if cfg.mcq else {}
    mme = mme_plan(sources.mme, cfg) if cfg.mme else {}
    block_items = [("refer", it) for items in refer.values() for it in items] + [
        ("hardblink", r) for rs in hardblink.values() for r in rs]
    unconstrained = spread(block_items, cfg.unconstrained_limit) if predict_unconstrained is not None else []
    n_main = len(block_items) + sum(len(v) for v in mcq.values()) + sum(len(v) for v in mme.values())
    n_base = n_main - (0 if cfg.base_refer else sum(len(v) for v in refer.values()))
    total = n_main + (n_base if base_predict is not None else 0) + len(unconstrained)

    ev = Evaluation()
    run = _Runner(total, progress, ev.errors, cfg.batch_size, cache=cache, tags=model_tags, world=world,
                  barrier=barrier)
    keeper = _Keeper(cfg.report_samples)
    depth = DepthQuality(cfg.depth_pairs)
    depth_cache: dict[str, np.ndarray] = {}
    digests: dict[str, str] = {}
    statuses: Counter[str] = Counter()

    def digest_of(path: str) -> str:
        if teacher_maps is None:
            return ""
        if path not in digests:
            try:
                digests[path] = image_digest(path)
            except ImageError:
                digests[path] = ""
        return digests[path]

    models: list[tuple[str, Predict]] = [(PERCEPTIO, predict)]
    if base_predict is not None:
        models.append((BASE, base_predict))

    for model, pred_fn in models:
        is_main = model == PERCEPTIO
        prefix = "" if is_main else "base."
        t_start = time.perf_counter()
        n_done = run.calls[model]

        # ---- referring segmentation
        for (ds, split), items in refer.items():
            acc = IoUAccumulator()
            pairs: list[tuple[int, int]] = []
            hits: list[int] = []
            no_mask = 0
            prompts = [refer_prompt(it.record.sentence) for it in items]
            if is_main or cfg.base_refer:
                preds = run.many(pred_fn, model, [(it.image.path, pr) for it, pr in zip(items, prompts)],
                                 benchmark=ds, split=split)
            else:  # the base has no [SEG]: its masks are empty whatever it says
                preds = [_EMPTY] * len(items)
                ev.notes["base.refer"] = ("not generated: the base has no [SEG], so its masks are empty and its "
                                          "cIoU 0 (evaluate.base_refer asks it anyway)")
            for it, prompt, p in zip(items, prompts, preds):
                r, im = it.record, it.image
                gt = ann_to_mask(r.segmentation, im.height, im.width).astype(bool)
                mask = getattr(p, "mask", None)
                pm = resize_mask(mask, gt.shape) if mask is not None else None
                pairs.append(intersection_union(pm, gt))
                iou = acc.add_counts(*pairs[-1])
                hits.append(int(iou >= 0.5))
                no_mask += mask is None
                key = f"{ds}/{split}/r{r.ref_id}/s{r.sent_id}"
                if is_main:
                    st = block_status(p, True, depth_spec)
                    statuses[st] += 1
                    dmap = getattr(p, "depth_map", None)
                    depth.add(dmap, _lookup(teacher_maps, im.digest), _true_depth(im.depth_path, depth_cache))
                    right = iou >= 0.5
                    if keeper.wants("refer", right):
                        keeper.keep("refer", Shown("refer", f"{ds} {split}", key, im.path, r.sentence, prompt,
                                                   p.text, r.category, right, iou, pm, gt, dmap, st))  # fmt: skip
                else:
                    keeper.base_answer(key, p.text, iou >= 0.5)
            for k, v in acc.result().items():
                ev.metrics[f"{prefix}{ds}.{split}.{k}"] = v
            ev.metrics[f"{prefix}{ds}.{split}.no_mask"] = no_mask / len(items)
            ev.samples[f"{prefix}{ds}.{split}.iou"] = pairs
            ev.samples[f"{prefix}{ds}.{split}.p50"] = hits

        # ---- HardBLINK
        per_n: dict[int, float] = {}
        tok_n: dict[int, float] = {}
        for n, recs in hardblink.items():
            oks: list[bool] = []
            invalid = 0
            tok_oks: list[int] = []  # the depth-token diagnostic, over the questions with points
            prompts = [hardblink_prompt(r.question) for r in recs]
            preds = run.many(pred_fn, model, [(r.image_path, pr) for r, pr in zip(recs, prompts)],
                             benchmark="hardblink", split=str(n))
            for r, prompt, p in zip(recs, prompts, preds):
                truth = label_of(r.answer)
                got = parse_choice(p.text, r.labels)
                right = got == truth
                oks.append(right)
                invalid += got is None
                key = f"hardblink/{r.qid}"
                if is_main:
                    st = block_status(p, False, depth_spec)
                    statuses[st] += 1
                    dmap = getattr(p, "depth_map", None)
                    if r.points:  # the public release has none: the diagnostic needs them
                        size = _image_hw(r.image_path)
                        tok_oks.append(int(size is not None
                                           and token_depth_choice(dmap, r.points, r.labels, size) == truth))
                    depth.add(dmap, _lookup(teacher_maps, digest_of(r.image_path)),
                              _true_depth(r.depth_path, depth_cache))  # fmt: skip
                    if keeper.wants("hardblink", right):
                        keeper.keep("hardblink", Shown("hardblink", f"hardblink {n}", key, r.image_path, r.question,
                                                       prompt, p.text, r.answer, right, None, None, None, dmap, st,
                                                       tuple(r.points), tuple(r.labels)))
                else:
                    keeper.base_answer(key, p.text, right)
            per_n[n] = _choice_metrics(ev, f"{prefix}hardblink.{n}", oks, invalid)
            if is_main:
                _baselines(ev, f"hardblink.{n}", [len(r.labels) for r in recs],
                           [label_of(r.answer) or "" for r in recs])
            if is_main and tok_oks:
                tok_n[n] = sum(tok_oks) / len(tok_oks)
                ev.metrics[f"hardblink.{n}.token_depth"] = tok_n[n]
                ev.samples[f"hardblink.{n}.token_depth"] = tok_oks
                if len(tok_oks) < len(recs):
                    ev.notes[f"hardblink.{n}.token_depth"] = (
                        f"over the {len(tok_oks)} of {len(recs)} questions that have point coordinates")
        if per_n:
            ev.metrics[f"{prefix}hardblink.mean.accuracy"] = float(np.mean(list(per_n.values())))
            ev.samples[f"{prefix}hardblink.mean.accuracy"] = [
                ok for n in per_n for ok in ev.samples[f"{prefix}hardblink.{n}.accuracy"]]  # pooled
            if is_main:
                for base_line in ("chance", "majority"):
                    ev.metrics[f"hardblink.mean.{base_line}"] = float(np.mean(
                        [ev.metrics[f"hardblink.{n}.{base_line}"] for n in per_n]))
            if is_main and tok_n:
                ev.metrics["hardblink.mean.token_depth"] = float(np.mean(list(tok_n.values())))
                ev.samples["hardblink.mean.token_depth"] = [ok for n in tok_n for ok in ev.samples[
                    f"hardblink.{n}.token_depth"]]  # pooled
            if is_main and len(tok_n) < len(per_n):
                skipped = [str(n) for n in per_n if n not in tok_n]
                ev.notes["hardblink.depth_tokens.skipped"] = (
                    NO_POINTS if not tok_n else f"{NO_POINTS} (point counts {', '.join(skipped)})")

        # ---- multiple-choice benchmarks
        for name, recs in mcq.items():
            oks: list[bool] = []
            invalid = 0
            prompts = [mcq_prompt(r) for r in recs]
            preds = run.many(pred_fn, model, [(r.image_path, pr) for r, pr in zip(recs, prompts)],
                             benchmark=f"mcq.{name}")
            for r, prompt, p in zip(recs, prompts, preds):
                got = parse_mc_answer(p.text, r.options)
                right = got == r.answer
                invalid += got is None
                oks.append(right)
                key = f"mcq/{name}/{r.qid}"
                if is_main and keeper.wants(f"mcq.{name}", right):
                    keeper.keep(f"mcq.{name}", Shown("mcq", f"mcq {name}", key, r.image_path, r.question, prompt,
                                                     p.text, f"{r.answer}. {r.options.get(r.answer, '')}", right,
                                                     depth_map=getattr(p, "depth_map", None)))
                elif not is_main:
                    keeper.base_answer(key, p.text, right)
            _choice_metrics(ev, f"{prefix}mcq.{name}", oks, invalid)
            by_cat: dict[str, list[bool]] = {}
            for r, ok in zip(recs, oks):
                by_cat.setdefault(category_key(r.category), []).append(ok)
            for cat, v in sorted(by_cat.items()):
                _choice_metrics(ev, f"{prefix}mcq.{name}.category.{cat}", v)
            if is_main:
                _baselines(ev, f"mcq.{name}", [len(r.options) for r in recs], [r.answer for r in recs])

        # ---- MME
        rows: list[tuple[str, str, bool]] = []
        mme_invalid: Counter[str] = Counter()
        for task, recs in mme.items():
            prompts = [mme_prompt(r) for r in recs]
            preds = run.many(pred_fn, model, [(r.image_path, pr) for r, pr in zip(recs, prompts)],
                             benchmark="mme", split=task)
            for r, prompt, p in zip(recs, prompts, preds):
                got = parse_yes_no(p.text)
                right = got == r.answer
                mme_invalid[task] += got is None
                rows.append((task, r.image_key, right))
                key = f"mme/{r.qid}"
                if is_main and keeper.wants("mme", right):
                    keeper.keep("mme", Shown("mme", f"mme {task}", key, r.image_path, r.question, prompt,
                                             p.text, r.answer, right, depth_map=getattr(p, "depth_map", None)))
                elif not is_main:
                    keeper.base_answer(key, p.text, right)
        if rows:
            for k, v in mme_scores(rows, {t: group_of(t) for t in mme}).items():
                ev.metrics[f"{prefix}mme.{k}"] = v
            for task in mme:
                ev.metrics[f"{prefix}mme.{task}.invalid"] = mme_invalid[task] / len(mme[task])
                ev.samples[f"{prefix}mme.{task}.acc"] = [int(ok) for t, _, ok in rows if t == task]

        seconds = time.perf_counter() - t_start
        ev.timings[f"{model}.seconds"] = seconds
        ev.timings[f"{model}.samples_per_s"] = (run.calls[model] - n_done) / seconds if seconds > 0 else math.nan
        if cache is not None:
            ev.timings[f"{model}.from_cache"] = float(run.cached[model])

    # ---- the perception block, constrained and not
    n_block = sum(statuses.values())
    if n_block:
        ev.metrics["perception_block.wellformed"] = statuses[ParseStatus.OK.value] / n_block
        ev.metrics["perception_block.n"] = float(n_block)
        ev.block_status["constrained"] = dict(statuses)
    if unconstrained:
        loose: Counter[str] = Counter()
        t0 = time.perf_counter()
        pairs = [(it.image.path, refer_prompt(it.record.sentence)) if kind == "refer"
                 else (it.image_path, hardblink_prompt(it.question)) for kind, it in unconstrained]
        preds = run.many(predict_unconstrained, PERCEPTIO + "-unconstrained", pairs, benchmark="perception_block")
        for (kind, _), p in zip(unconstrained, preds):
            loose[block_status(p, kind == "refer", depth_spec)] += 1
        ev.metrics["perception_block.wellformed_unconstrained"] = loose[ParseStatus.OK.value] / len(unconstrained)
        ev.metrics["perception_block.n_unconstrained"] = float(len(unconstrained))
        ev.block_status["unconstrained"] = dict(loose)
        ev.timings["unconstrained.seconds"] = time.perf_counter() - t0

    ev.metrics.update(depth.result())
    ev.shown = list(keeper.kept.values())
    add_intervals(ev, n_boot=cfg.bootstrap, seed=0)
    return ev


def _choice_metrics(ev: Evaluation, stem: str, oks: Sequence[bool], invalid: int | None = None) -> float:
    """``<stem>.{accuracy, n}`` (and ``invalid``, the share of unreadable answers, when counted) and
    the per-sample scores behind them; returns the accuracy."""
    accuracy = sum(oks) / len(oks)
    ev.metrics[f"{stem}.accuracy"] = accuracy
    ev.metrics[f"{stem}.n"] = float(len(oks))
    if invalid is not None:
        ev.metrics[f"{stem}.invalid"] = invalid / len(oks)
    ev.samples[f"{stem}.accuracy"] = [int(ok) for ok in oks]
    return accuracy


def _baselines(ev: Evaluation, stem: str, n_options: Sequence[int], answers: Sequence[str]) -> None:
    """``<stem>.chance`` and ``<stem>.majority`` of a multiple-choice set."""
    ev.metrics[f"{stem}.chance"] = chance_baseline(n_options)
    ev.metrics[f"{stem}.majority"] = majority_baseline(answers)


def add_intervals(ev: Evaluation, n_boot: int = 1000, seed: int = 0) -> None:
    """Fill ``ev.intervals`` and ``ev.differences`` from ``ev.samples`` (:class:`Evaluation`): an
    accuracy's Wilson interval (``hardblink.mean.accuracy``: over the pooled questions), a split's
    cIoU and gIoU by the bootstrap over its expressions, and for every metric the base has too the
    paired difference Perceptio minus base on the same samples."""
    for key, vals in ev.samples.items():
        if key.endswith(".iou"):
            stem = key[: -len(".iou")]
            i, u = [p[0] for p in vals], [p[1] for p in vals]
            for metric, est in bootstrap_iou(i, u, n_boot=n_boot, seed=seed).items():
                ev.intervals[f"{stem}.{metric}"] = est
            if not key.startswith("base.") and f"base.{key}" in ev.samples:
                other = ev.samples[f"base.{key}"]
                diff = paired_iou_difference(i, u, [p[0] for p in other], [p[1] for p in other], n_boot=n_boot,
                                             seed=seed)  # fmt: skip
                for metric, est in diff.items():
                    ev.differences[f"{stem}.{metric}"] = est
        else:
            ev.intervals[key] = proportion(int(sum(vals)), len(vals))
            if not key.startswith("base.") and f"base.{key}" in ev.samples:
                ev.differences[key] = paired_difference(vals, ev.samples[f"base.{key}"], n_boot=n_boot, seed=seed)


def _image_hw(path: str) -> tuple[int, int] | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.height, im.width
    except OSError:
        return None


__all__ = [
    "NO_POINTS",
    "DepthQuality",
    "Evaluation",
    "Predict",
    "ProgressFn",
    "Shown",
    "TextOnlyLM",
    "base_predictor",
    "add_intervals",
    "block_status",
    "category_key",
    "clean_expression",
    "format_mc_prompt",
    "hardblink_plan",
    "hardblink_prompt",
    "load_predictors",
    "make_predictors",
    "mcq_plan",
    "mcq_prompt",
    "mme_plan",
    "mme_prompt",
    "model_predictor",
    "refer_plan",
    "refer_prompt",
    "run_evaluation",
    "spread",
    "token_depth_choice",
]
