"""Depth (SPEC §2): the Depth Anything V2 teacher (``teacher``), the teacher's maps on disk
(``maps``), depth metrics (``metrics``), the VQ-VAE codebook (``vqvae``), the tokenizer that turns
a map into N = grid^2 code indices and back (``tokenizer``) and the interface every later stage sees
it through (``codec``: the ``DepthCodec`` protocol, and ``DepthCodecSpec``, K and N read from the
codebook artifact; the one source of K and N for every later stage). The fits of the teacher and
the VQ-VAE run on the one training loop, in ``training``.

May import: the root modules and ``data``. Never ``curation``, ``model``, ``training`` or
``evaluation``.
"""
