"""One-file model artifacts: weights, architecture, class names, training µm/px and free metadata.

Stored with ``torch.save`` as plain tensors and JSON-like values. A model file may come from anyone, so
:func:`load_model` trusts nothing in it: it checks the zip archive (no compressed entries, declared sizes
within the file and under ``WSI_MAX_MODEL_BYTES``) before reading it, unpickles with
``torch.load(weights_only=True)`` (no code runs), checks every field's type and range, builds the network
on the meta device to count its values (under ``WSI_MAX_MODEL_PARAMETERS``) and to compare their names,
shapes and dtypes with the stored tensors, and only then allocates memory. Each refusal is a one-line
:class:`ModelArtifactError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zipfile
from pathlib import Path
from typing import Any

import torch

from unet.model import ModelCard, UNet, UNetConfig

FORMAT = "wsi-unet-model"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
# Limits for files from elsewhere; raise them with the environment variables (or load_model's keywords).
MAX_ARTIFACT_BYTES = 2 * 1024**3  # WSI_MAX_MODEL_BYTES: total (uncompressed) size of the archive's entries
MAX_PARAMETERS = 500_000_000  # WSI_MAX_MODEL_PARAMETERS: values in the model's weights and buffers
REEXPORT = "re-export it with unet.save_model"


class ModelArtifactError(ValueError):
    """A file that is not a readable U-Net model artifact."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int_in(low: int, high: int):
    return lambda v: _is_int(v) and low <= v <= high, f"a whole number from {low} to {high}"


_NUMBERS = (lambda v: isinstance(v, list) and 0 < len(v) <= 4096 and all(map(_is_number, v)), "a list of numbers")
# UNetConfig field -> (check, what it must be); the stored config must have exactly these keys.
CONFIG_CHECKS = {
    "in_channels": _int_in(1, 4096),
    "num_classes": _int_in(1, 4096),
    "base_channels": _int_in(1, 4096),
    "depth": _int_in(1, 12),
    "padding": (lambda v: v in ("valid", "same"), "'valid' or 'same'"),
    "batch_norm": (lambda v: isinstance(v, bool), "true or false"),
    "up_mode": (lambda v: v in ("transpose", "bilinear"), "'transpose' or 'bilinear'"),
    "input_mean": _NUMBERS,
    "input_std": _NUMBERS,
    "halo_override": (lambda v: v is None or (_is_int(v) and 0 <= v <= 65536), "null or a whole number to 65536"),
}


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
    class_names = class_names or model.card.class_names  # re-saving a loaded model keeps what its card says
    mpp = model.card.mpp if mpp is None else mpp
    metadata = metadata or dict(model.card.metadata)
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


def load_model(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    *,
    max_bytes: int | None = None,
    max_parameters: int | None = None,
) -> UNet:
    """Rebuild the model saved by :func:`save_model` on the CPU; it comes back in eval mode.

    The artifact's extras are on the model's card, ``model.card`` (:class:`unet.model.ModelCard`): class
    names, µm/px, metadata and the file's sha256 (for provenance). ``max_bytes`` / ``max_parameters`` default to
    ``$WSI_MAX_MODEL_BYTES`` / ``$WSI_MAX_MODEL_PARAMETERS``, else 2 GiB / 500 million. Any file that is
    not a sound artifact within those limits raises a one-line :class:`ModelArtifactError`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found; pass the path of a file written by unet.save_model")
    _check_archive(path, _limit(max_bytes, "WSI_MAX_MODEL_BYTES", MAX_ARTIFACT_BYTES))
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for bad files
        raise _refuse(path, f"not a readable model artifact ({type(error).__name__}: {_first_line(error)}); "
                      "the file may be truncated, tampered with or of another kind") from None  # fmt: skip
    config, metadata, state = _check_payload(path, payload)
    with torch.device("meta"):  # the architecture without memory: count and compare before allocating
        model = UNet(config)
    expected = model.state_dict()
    limit = _limit(max_parameters, "WSI_MAX_MODEL_PARAMETERS", MAX_PARAMETERS)
    count = sum(t.numel() for t in expected.values())
    if count > limit:
        raise _refuse(path, f"its config describes a model of {count:,} values, over the limit of {limit:,}",
                      "if you trust the file, raise WSI_MAX_MODEL_PARAMETERS")  # fmt: skip
    _check_weights(path, state, expected)
    model.to_empty(device="cpu")  # every parameter and buffer is then overwritten by the stored one
    try:
        model.load_state_dict(state)
    except (RuntimeError, NotImplementedError) as error:
        raise _refuse(path, f"weights do not load into the stored architecture: {_first_line(error)}") from None
    model.card = ModelCard(
        class_names=list(payload["class_names"]), mpp=None if payload["mpp"] is None else float(payload["mpp"]),
        checksum=file_sha256(path), metadata=metadata,
    )  # fmt: skip
    return model.eval()


def _refuse(path: Path, problem: str, fix: str = REEXPORT) -> ModelArtifactError:
    return ModelArtifactError(f"{path}: {problem}; {fix}")


def _first_line(error: BaseException | str, limit: int = 120) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else ""


def _short(value: Any) -> str:
    return _first_line(repr(value), 60)


def _limit(value: int | None, variable: str, default: int) -> int:
    if value is None:
        text = os.environ.get(variable, "").strip()
        try:
            value = int(text) if text else default
        except ValueError:
            raise ValueError(f"{variable}={text!r} is not a whole number; set it to a limit like {default}") from None
    if value < 1:
        raise ValueError(f"{variable} must be at least 1, got {value}")
    return value


def _check_archive(path: Path, max_bytes: int) -> None:
    """Refuse, before torch reads it, an archive whose entries could take more memory than the file's size."""
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError) as error:
        raise _refuse(path, f"not a readable model artifact (not the zip archive torch.save writes: "
                      f"{_first_line(error)}); the file may be truncated or of another kind") from None  # fmt: skip
    for entry in entries:
        if entry.compress_type != zipfile.ZIP_STORED or entry.file_size != entry.compress_size:
            raise _refuse(path, f"archive entry {entry.filename!r} is compressed ({entry.compress_size:,} bytes "
                          f"declaring {entry.file_size:,}): torch.save never compresses, and a compressed entry "
                          "can expand far beyond the file's size")  # fmt: skip
    total, size = sum(entry.file_size for entry in entries), path.stat().st_size
    if total > size:
        raise _refuse(path, f"its archive entries declare {total:,} bytes but the file holds only {size:,} "
                      "(overlapping or forged entries)")  # fmt: skip
    if total > max_bytes:
        raise _refuse(path, f"it holds {total:,} bytes, over the limit of {max_bytes:,}",
                      "if you trust the file, raise WSI_MAX_MODEL_BYTES")  # fmt: skip


def _check_payload(path: Path, payload: Any) -> tuple[UNetConfig, dict, dict[str, torch.Tensor]]:
    """Every field's type and range; returns the config, the metadata and the state dict."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise _refuse(path, f"not a U-Net model artifact (no '{FORMAT}' header)", "export it with unet.save_model")
    version = payload.get("format_version")
    if _is_int(version) and version > FORMAT_VERSION:
        raise _refuse(path, f"artifact format {version} is newer than this software (which reads format "
                      f"{FORMAT_VERSION})", "upgrade this software to load it")  # fmt: skip
    if not (_is_int(version) and version in SUPPORTED_VERSIONS):
        raise _refuse(path, f"format_version is {_short(version)}, not a supported version {SUPPORTED_VERSIONS}")
    config = _json_field(path, payload, "config", dict)
    known = set(CONFIG_CHECKS)
    if set(config) != known:
        unknown, missing = sorted(set(config) - known), sorted(known - set(config))
        raise _refuse(path, "config " + (f"has unknown keys {unknown}" if unknown else f"lacks keys {missing}"))
    for key, (check, wanted) in CONFIG_CHECKS.items():
        if not check(config[key]):
            raise _refuse(path, f"config {key} is {_short(config[key])}, expected {wanted}")
    try:
        config = UNetConfig(**{**config, **{key: tuple(config[key]) for key in ("input_mean", "input_std")}})
    except ValueError as error:
        raise _refuse(path, f"config is inconsistent: {_first_line(error)}") from None
    names = payload.get("class_names")
    if not (isinstance(names, list) and all(isinstance(name, str) for name in names)):
        raise _refuse(path, f"class_names is {_short(names)}, expected a list of strings")
    if len(names) != config.num_classes:
        raise _refuse(path, f"{len(names)} class_names for a model with {config.num_classes} classes")
    mpp = payload.get("mpp")
    if not (mpp is None or (_is_number(mpp) and mpp > 0)):
        raise _refuse(path, f"mpp is {_short(mpp)}, expected null or a positive number of µm/px")
    metadata = _json_field(path, payload, "metadata", dict)
    state = payload.get("state_dict")
    if not isinstance(state, dict):
        raise _refuse(path, f"state_dict is a {type(state).__name__}, expected a dict of names to tensors")
    for name, tensor in state.items():
        if not (isinstance(name, str) and isinstance(tensor, torch.Tensor)):
            raise _refuse(path, f"state_dict entry {_short(name)} is a {type(tensor).__name__}, expected a tensor")
    return config, metadata, state


def _json_field(path: Path, payload: dict, key: str, kind: type) -> Any:
    text = payload.get(key)
    try:
        value = json.loads(text) if isinstance(text, str) else None
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, kind):
        raise _refuse(path, f"{key} is {_short(text)}, expected a JSON {kind.__name__} in a string")
    return value


def _check_weights(path: Path, state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """The stored tensors must be exactly the ones the config's architecture has (floats may differ in precision)."""
    for name in [*expected, *state]:
        if name not in state or name not in expected:
            problem = "is missing" if name not in state else "is not part of the architecture"
            raise _refuse(path, f"weights do not match the stored architecture: tensor {name!r} {problem}")
        got, want = state[name], expected[name]
        same_kind = got.dtype == want.dtype or (got.dtype.is_floating_point and want.dtype.is_floating_point)
        if got.layout != torch.strided or got.is_meta or got.shape != want.shape or not same_kind:
            raise _refuse(path, f"weights do not match the stored architecture: tensor {name!r} is {_describe(got)}, "
                          f"the config needs {_describe(want, stored=False)}")  # fmt: skip


def _describe(tensor: torch.Tensor, stored: bool = True) -> str:
    text = f"{str(tensor.dtype).removeprefix('torch.')} {tuple(tensor.shape)}"
    if tensor.layout != torch.strided:
        text += f" {tensor.layout}"
    return text + (" without data (meta)" if stored and tensor.is_meta else "")


def model_checksum(model: torch.nn.Module) -> str:
    """The artifact's sha256 when the model was loaded from one, else a sha256 of its weights and config
    (so a store can tell which model made it even for models that never touched a file)."""
    if model.card.checksum:
        return model.card.checksum
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
