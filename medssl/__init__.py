"""medssl: self-supervised pretraining of 2D/3D Vision Transformers on unlabeled medical images.

The package is organised as the flow of data (see ``docs/architecture.md``):
``medssl.data`` (files on disk -> datalists -> tensors), ``medssl.models`` (the ViT backbone),
``medssl.tasks`` (pretraining tasks), ``medssl.engine`` (the trainer), ``medssl.eval``
(embeddings and evaluation), ``medssl.viz`` (pictures) and ``medssl.cli`` (the ``medssl``
command). Sub-packages are imported on first use, so ``import medssl`` is instant and bundle
configs can write ``$import medssl`` then ``medssl.data.synthetic.embedded_dataset(...)``.
"""

from .lazy import lazy_submodules

__version__ = "0.1.0"

__getattr__ = lazy_submodules(__name__)
