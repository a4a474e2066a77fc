"""medssl: self-supervised pretraining of 2D/3D Vision Transformers on unlabeled medical images.

The package is organised as the flow of data (see ``docs/architecture.md``):
``medssl.data`` (files on disk -> datalists -> tensors), ``medssl.viz`` (pictures) and
``medssl.cli`` (the ``medssl`` command). Sub-packages import their heavy dependencies lazily.
"""

__version__ = "0.1.0"
