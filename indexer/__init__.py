"""The indexer: reader (walk + parallel decode) -> mapper (visual encoder) -> writer (SQLite + FAISS), driven by a runner."""
