"""Joint dataset curation (SPEC §5): records to one sample schema (``sample``, ``curate``,
``filters``, ``describe``), WebDataset shards with a parquet manifest (``shards``) and the map-style
reader of those shards that training uses (``wds_loader``).

May import: the root modules, ``format`` and ``data``. Never ``model``, ``training`` or
``evaluation``.
"""
