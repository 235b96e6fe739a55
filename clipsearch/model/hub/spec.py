"""`hf:ORG/REPO[/SUBFOLDER][@REVISION]` -> `HubRef`, and the name of its folder in the model cache."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ...errors import ModelNotAvailable

HUB_PREFIX = "hf:"
_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,254}$")


@dataclass(frozen=True)
class HubRef:
    repo_id: str  # ORG/REPO
    subfolder: str = ""  # "" or "a/b": where the bundle lies inside the repository
    revision: str | None = None  # branch, tag or commit; None = the default branch

    @property
    def spec(self) -> str:
        text = HUB_PREFIX + self.repo_id + (f"/{self.subfolder}" if self.subfolder else "")
        return text + (f"@{self.revision}" if self.revision else "")

    @property
    def cache_name(self) -> str:
        """The bundle's folder in the model cache: `hf--ORG--REPO[--SUB][@REV]` (also a valid --model name)."""
        name = "hf--" + self.repo_id.replace("/", "--")
        if self.subfolder:
            name += "--" + self.subfolder.replace("/", "--")
        if self.revision:
            name += "@" + self.revision.replace("/", "--")
        return name

    def in_repo(self, path: str) -> str:
        """A path inside the bundle's folder as a path inside the repository."""
        return f"{self.subfolder}/{path}" if self.subfolder else path


def is_hub_spec(text: str) -> bool:
    return text.startswith(HUB_PREFIX)


def parse_hub_spec(text: str) -> HubRef:
    """Parse `hf:ORG/REPO[/SUBFOLDER][@REVISION]`; ModelNotAvailable with the expected form otherwise."""
    body = text[len(HUB_PREFIX):] if is_hub_spec(text) else text
    path, at, revision = body.partition("@")
    parts = [p for p in path.strip("/").split("/")]
    if len(parts) < 2 or not all(_PART.match(p) for p in parts) or any(p in (".", "..") for p in parts) \
            or (at and not _REVISION.match(revision)) or ".." in revision.split("/"):
        raise ModelNotAvailable(
            f"'{text}' is not a Hugging Face model spec",
            "Write hf:ORG/REPO, hf:ORG/REPO@REVISION or hf:ORG/REPO/SUBFOLDER, e.g. hf:immich-app/ViT-B-32__openai")
    return HubRef(repo_id="/".join(parts[:2]), subfolder="/".join(parts[2:]), revision=revision or None)
