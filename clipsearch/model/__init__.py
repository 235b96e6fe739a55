"""The model side: bundles (format, provenance), the torch-free runtime (ONNX sessions, tokenizer, image
transform), `--model` resolution, and export from open_clip (torch, `export` extra)."""
