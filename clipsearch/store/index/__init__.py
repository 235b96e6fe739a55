"""The vector index of a collection: which FAISS index to build (policy.py), building, growing, saving and
searching it (vectors.py), and the search knobs tuned at build time (tuning.py)."""
