"""clipsearch: find photos by describing them.

The runtime (indexing and querying) needs only onnxruntime, numpy, Pillow and tokenizers; torch is
imported only by `clipsearch.model.export` and `clipsearch.train`.
"""

__version__ = "0.1.0"
