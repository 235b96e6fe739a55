"""The index side's storage: a collection is a folder with SQLite metadata (`database`) and a FAISS vector
index (`vectors`), kept in agreement by `collection`."""
