"""histcode: self-supervised computational pathology.

Stage 1 (``histcode.pretrain``) learns a tile encoder with SimCLR on unlabeled tiles; stage 2
(``histcode.finetune``) aggregates tile embeddings with attention MIL into slide predictions of
tumour status and differential expression of driver genes. This package is the shared core:
slide reading, tissue segmentation, tiling, zarr stores, the checkpoint registry and the CLI.
It never imports either stage.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("histcode")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
