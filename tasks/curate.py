"""Stage ``curate``: every source into one sample schema, written as WebDataset shards with a
parquet manifest and a quarantine table (SPEC §5; ``perceptio_core/curation/curate.py``). The depth
tokens (``tokenize_depth``) are checked against the N and K of the codebook (``train_vqvae``'s
``config.json``) before anything is written."""

from __future__ import annotations

from tasks.runner import StageContext, StageOutput, StageSpec


def _conversations(root: str, rel: str | None) -> str | None:
    """A LLaVA / GLaMM JSON named in ``data`` (relative to the data root, as the sources stage
    resolved and checked it)."""
    from perceptio_core.data.sources import data_path

    return str(data_path(root, rel)) if rel else None


def curate(ctx: StageContext) -> StageOutput:
    import pyarrow.parquet as pq

    from perceptio_core.curation.curate import curate as curate_samples
    from perceptio_core.curation.shards import verify_read_back
    from perceptio_core.data.records import QuarantineEntry
    from perceptio_core.depth.codec import DepthCodecSpec
    from perceptio_core.depth.maps import DepthMaps
    from tasks.common import load_sources, read_tokens

    sources = load_sources(ctx)
    tokens_dir = ctx.upstream_dir("tokenize_depth")
    tokens = read_tokens(tokens_dir)
    codebook = DepthCodecSpec.from_pretrained(ctx.upstream_dir("train_vqvae"))  # K and N, no weights
    maps = DepthMaps(ctx.upstream_dir("teacher_depth"))
    upstream = {name: ref.key for name, ref in ctx.upstream.items()}
    out = ctx.writer.staging
    res = curate_samples(
        sources, tokens, maps, ctx.cfg.curate, upstream, out,
        num_tokens=codebook.num_tokens, codebook_size=codebook.codebook_size,
        tokens_source=f"{tokens_dir / 'tokens.npy'} (tokenize_depth), against the codebook {codebook.source}",
        ade_class_names=sources.ade_classes or None,
        llava_json=_conversations(sources.root, ctx.cfg.data.llava_json),
        glamm_json=_conversations(sources.root, ctx.cfg.data.glamm_json),
    )
    # the quality check before publishing: the shards read back, sample for sample, as the manifest
    n = verify_read_back(out)
    if n != res.n_samples:
        raise RuntimeError(f"curate: read back {n} samples through webdataset, wrote {res.n_samples}")
    stats = res.stats
    metrics = {
        "samples": stats["samples"],  # by source, then split
        "samples_total": res.n_samples,
        "tasks": stats["tasks"],
        "dropped": stats["dropped"],  # by reason
        "paper_counts": stats["paper_counts"],  # train samples per source beside the paper's
        "dropped_total": stats["dropped_total"],
        "quarantined": res.n_quarantined,
        "shards": len(res.shards),
        "bytes": sum(s.n_bytes for s in res.shards),
        "resumed_samples": res.n_resumed,
    }
    ctx.log.info("curate: %d samples in %d shards, %d dropped", n, len(res.shards), stats["dropped_total"])
    table = pq.read_table(out / "quarantine.parquet").to_pylist()
    quarantine = [QuarantineEntry(r["source"], r["record"], r["reason"]) for r in table]
    return StageOutput(
        metrics=metrics, quarantine=quarantine, notes=[f"{n} samples read back through webdataset"]
    )


SPEC = StageSpec(
    name="curate",
    upstream=("sources", "teacher_depth", "train_vqvae", "tokenize_depth"),
    sections=("curate", "data.llava_json", "data.glamm_json"),
    body=curate,
    description="joint perception samples (RefCOCO/+/g, ADE20k, depth CoT) as WebDataset shards",
)
