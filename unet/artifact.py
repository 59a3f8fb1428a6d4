"""One-file model artifacts: weights, architecture, class names, training µm/px and free metadata.

Stored with ``torch.save`` as plain tensors and JSON-like values and loaded with
``torch.load(weights_only=True)``, so loading a file never unpickles arbitrary objects.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from unet.model import UNet, UNetConfig

FORMAT = "wsi-unet-model"
FORMAT_VERSION = 1


class ModelArtifactError(ValueError):
    """A file that is not a readable U-Net model artifact."""


def save_model(
    model: UNet,
    path: str | Path,
    *,
    class_names: list[str] | None = None,
    mpp: float | None = None,
    **metadata: Any,
) -> Path:
    """Write ``model`` to ``path``; ``mpp`` is the µm/px of the images it was trained on."""
    model = getattr(model, "module", model)  # unwrap DDP / DataParallel
    if not isinstance(model, UNet):
        raise TypeError(f"save_model expects a unet.UNet, got {type(model).__name__}")
    class_names = list(class_names) if class_names else [f"class_{i}" for i in range(model.num_classes)]
    if len(class_names) != model.num_classes:
        raise ValueError(f"{len(class_names)} class names for a model with {model.num_classes} classes")
    try:
        json.dumps(metadata)
    except TypeError as error:
        raise TypeError(f"metadata must be JSON-serialisable: {error}") from None
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": json.dumps(model.config.to_dict()),
        "class_names": class_names,
        "mpp": None if mpp is None else float(mpp),
        "metadata": json.dumps(metadata),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    torch.save(payload, tmp)
    tmp.replace(path)  # never leave a half-written artifact under the real name
    return path


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> UNet:
    """Rebuild the model saved by :func:`save_model`; it comes back in eval mode.

    The artifact's extras are on the model: ``class_names``, ``mpp``, ``metadata`` and ``checksum``
    (sha256 of the file, for provenance).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found; pass the path of a file written by unet.save_model")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for bad files
        raise ModelArtifactError(
            f"{path}: not a readable model artifact ({type(error).__name__}: {str(error).splitlines()[0][:120]}); "
            "the file may be truncated or of another kind: re-export it with unet.save_model"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelArtifactError(f"{path}: not a U-Net model artifact (no '{FORMAT}' header); export it with unet.save_model")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise ModelArtifactError(f"{path}: artifact format {payload['format_version']} is newer than this software; upgrade it")
    config = json.loads(payload["config"])
    for key in ("input_mean", "input_std"):
        config[key] = tuple(config[key])
    model = UNet(UNetConfig(**config))
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as error:
        raise ModelArtifactError(f"{path}: weights do not match the stored architecture: {str(error)[:200]}") from None
    model.class_names = list(payload["class_names"])
    model.mpp = payload["mpp"]
    model.metadata = json.loads(payload["metadata"])
    model.checksum = file_sha256(path)
    return model.eval()


def model_checksum(model: torch.nn.Module) -> str:
    """The artifact's sha256 when the model was loaded from one, else a sha256 of its weights and config
    (so a store can tell which model made it even for models that never touched a file)."""
    if getattr(model, "checksum", None):
        return model.checksum
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return "weights:" + digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
