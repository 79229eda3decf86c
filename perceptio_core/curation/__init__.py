"""Joint dataset curation (SPEC §5): records to one sample schema (``sample``), the stream of
samples and its driver (``curate``: RefCOCO/+/g and ADE20k samples, then the others), depth
chain-of-thought samples (``depth_cot``), LLaVA and GLaMM conversations (``instructions``), what
every builder reads and reports (``inputs``), filters and descriptions (``filters``,
``describe``), WebDataset shards with a parquet manifest (``shards``) and the map-style reader of
those shards that training uses (``wds_loader``).

May import: the root modules, ``format`` and ``data``. Never ``model``, ``training`` or
``evaluation``.
"""
