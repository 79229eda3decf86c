"""The datasets as published (SPEC §5): one reader per dataset (``refer``, ``ade20k``,
``hardblink``, ``mcq``, ``mme``), the records they produce and the quarantine (``records``), resolving a data
root (``sources``), images and masks (``image_io``, ``masks``), HardBLINK's drawn point markers
(``markers``) and the restricted unpickler for REFER's pickles (``safe_pickle``).

May import: the root modules (``config``, ``device``, ``atomic_io``) and ``format``. Never
``model``, ``training`` or ``evaluation``.
"""
