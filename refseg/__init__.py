"""refseg: training-free reference-based instance segmentation at cluster scale.

Installed, refseg's code imports under this one name: ``refseg.core`` (the method; the
repository's ``refseg_core/``), ``refseg.pipeline`` (Ray Data; ``pipeline/``) and
``refseg.jobs`` (the ``refseg`` command line; ``jobs/``).
"""

__version__ = "0.1.0"
