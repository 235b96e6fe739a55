"""The resident search helper: `clipsearch search` answered by a process that already has the model and index
loaded, so a new query from the shell costs an interpreter start plus one encoder call instead of importing
numpy, onnxruntime and FAISS and opening the model and the index each time.

- It starts itself: a search that found no helper answers in-process as before and then starts one in the
  background (detached, output to /dev/null) with that collection preloaded.
- It is private to the user: its socket lives in a folder only the user can enter ($XDG_RUNTIME_DIR/clipsearch,
  else /tmp/clipsearch-UID, mode 0700, refused when owned by anyone else), and on Linux it also checks each
  peer's uid (SO_PEERCRED).
- It never serves stale results: each request re-checks the collection (database file identity, store
  generation, a rebuild's CURRENT pointer) and the model files, and reloads what changed before answering; an
  index that is behind SQLite is rebuilt at once rather than reused. The socket's name hashes the clipsearch code
  (version and source files), the interpreter and the environment that choose models and folders, so a helper of
  other code or settings is never asked.
- It exits after CLIPSEARCH_HELPER_IDLE seconds without a request (default 900), or when its socket is removed.
  CLIPSEARCH_HELPER=0 turns it off (no helper is asked or started).

protocol.py holds the wire format and where the socket lives, client.py what the CLI calls, helper.py the
process itself.
"""
