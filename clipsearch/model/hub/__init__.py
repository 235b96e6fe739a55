"""Models from the Hugging Face Hub without torch: `--model hf:ORG/REPO[/SUBFOLDER][@REVISION]`.

`huggingface_hub` downloads (its cache, HF_HUB_OFFLINE, HF_ENDPOINT, resumable downloads, its progress
bars); what it fetched becomes a bundle in clipsearch's model cache:

  * spec.py     what the user typed -> `HubRef` (repo, subfolder, revision) and the cache folder's name
  * fetch.py    the huggingface_hub calls, their errors turned into one clear message each
  * layout.py   which kind of repository it is (a clipsearch bundle, or an Immich CLIP export)
  * published.py a clipsearch bundle published on the Hub, checked against its model.json and copied
  * immich.py   an Immich CLIP repository converted into a bundle (tokenizer parity checked, else refused)
  * graphs.py   Immich's batch-1 ONNX graphs wrapped into batched graphs (onnx Scan; weights untouched)
  * pull.py     the whole pull, and resolution of a spec against the cache (no network when cached)
"""

from .pull import pull, resolve_hub
from .spec import HUB_PREFIX, HubRef, is_hub_spec, parse_hub_spec

__all__ = ["HUB_PREFIX", "HubRef", "is_hub_spec", "parse_hub_spec", "pull", "resolve_hub"]
