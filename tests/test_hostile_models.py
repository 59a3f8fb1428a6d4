"""Untrusted model files (issue 13): every hostile artifact or checkpoint is refused with one line that names
the file, before it can allocate much memory or run code; valid artifacts still load exactly."""

from __future__ import annotations

import dataclasses
import json
import re
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import run_job

from unet import ModelArtifactError, UNet, UNetConfig, load_model, save_model
from unet.artifact import CONFIG_CHECKS

REPO = Path(__file__).resolve().parents[1]
DROP = object()  # a payload or config value that removes the key


@pytest.fixture(autouse=True)
def default_limits(monkeypatch):
    """The default caps, whatever the environment running the tests sets (subprocesses inherit this)."""
    monkeypatch.delenv("WSI_MAX_MODEL_BYTES", raising=False)
    monkeypatch.delenv("WSI_MAX_MODEL_PARAMETERS", raising=False)


def tiny_artifact(tmp_path: Path) -> Path:
    return save_model(UNet(base_channels=2, depth=1), tmp_path / "good.pt", class_names=["bg", "fg"], mpp=0.5)


def hostile(tmp_path: Path, edit_config: dict | None = None, **changes) -> Path:
    """A copy of a tiny valid artifact with some payload fields (or keys of its config) changed or dropped."""
    payload = torch.load(tiny_artifact(tmp_path), weights_only=True)
    if edit_config is not None:
        values = {**json.loads(payload["config"]), **edit_config}
        payload["config"] = json.dumps({k: v for k, v in values.items() if v is not DROP})
    for key, value in changes.items():
        payload[key] = value
    payload = {k: v for k, v in payload.items() if v is not DROP}
    torch.save(payload, tmp_path / "bad.pt")
    return tmp_path / "bad.pt"


def refused(path: Path, problem: str, fix: str = "re-export it with unet.save_model", **kwargs) -> str:
    """Assert load_model refuses ``path`` with one line: the file, the problem (a regex), what to do."""
    with pytest.raises(ModelArtifactError) as info:
        load_model(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: "), message
    assert re.search(problem, message), message
    assert message.endswith(fix), message
    return message


def run_cli(tmp_path: Path, model: Path) -> subprocess.CompletedProcess:
    return run_job(str(tmp_path / "missing.svs"), "--out", str(tmp_path / "out"), "--model", str(model))


def assert_cli_usage_error(tmp_path: Path, model: Path, problem: str) -> None:
    result = run_cli(tmp_path, model)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {model}: "), result.stderr
    assert re.search(problem, lines[0]) and "Traceback" not in result.stderr, result.stderr


class RunsCode:
    """Unpickling this (without weights_only) runs ``exec``: it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


# ---------------------------------------------------------------------------------------- memory bombs

MEMORY_LIMITED_LOAD = """
import resource, sys, time
sys.path.insert(0, {repo!r})
from unet import ModelArtifactError, load_model

used = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (used + (1 << 30), resource.RLIM_INFINITY))  # 1 GiB more than now
started = time.perf_counter()
try:
    load_model({path!r})
    print("LOADED")
except ModelArtifactError as error:
    print(f"REFUSED in {{time.perf_counter() - started:.3f}} s: {{error}}")
"""


@pytest.mark.parametrize(
    "config, problem, fix",
    [
        ({"base_channels": 8192}, r"config base_channels is 8192, expected a whole number from 1 to 4096",
         "re-export it with unet.save_model"),
        ({"base_channels": 1024, "depth": 4}, r"describes a model of [\d,]+ values, over the limit of 500,000,000",
         "if you trust the file, raise WSI_MAX_MODEL_PARAMETERS"),
    ],
    ids=["base_channels_8192", "parameters_over_the_default_cap"],
)  # fmt: skip
def test_huge_architecture_is_refused_fast_without_allocating_it(tmp_path, config, problem, fix):
    """A 2 KB file whose config describes a multi-gigabyte network: refused within 1 GiB of address space
    (building the network first would need terabytes and fail with an allocator error instead)."""
    path = hostile(tmp_path, edit_config=config)
    assert path.stat().st_size < 10_000
    script = MEMORY_LIMITED_LOAD.format(repo=str(REPO), path=str(path))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.startswith("REFUSED"), result.stdout + result.stderr
    assert float(result.stdout.split()[2]) < 30, result.stdout  # seconds: no minutes spent filling memory
    line = result.stdout.split(": ", 1)[1].rstrip("\n")
    assert "\n" not in line and line.startswith(f"{path}: ") and line.endswith(fix), line
    assert re.search(problem, line), line


def zip_bomb(tmp_path: Path) -> Path:
    """An artifact whose tensor record is deflate-compressed: ~0.3 MB on disk, 256 MiB once inflated.

    torch.save writes a 12345-float tensor; the pickle is patched to declare 2**26 floats and the record
    is replaced by 256 MiB of zeros, compressed (written in 1 MiB chunks: the test never holds it)."""
    payload = torch.load(tiny_artifact(tmp_path), weights_only=True)
    payload["state_dict"]["extra"] = torch.zeros(12345)
    torch.save(payload, tmp_path / "plain.pt")
    with zipfile.ZipFile(tmp_path / "plain.pt") as source:
        entries = {info.filename: source.read(info) for info in source.infolist()}
    record = next(name for name, data in entries.items() if len(data) == 12345 * 4)
    pickle_name = next(name for name in entries if name.endswith("/data.pkl"))
    small, big = b"M" + struct.pack("<H", 12345), b"J" + struct.pack("<i", 1 << 26)
    assert entries[pickle_name].count(small) == 2  # the storage's size and the tensor's shape
    entries[pickle_name] = entries[pickle_name].replace(small, big)
    del entries[record]
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
        info = zipfile.ZipInfo(record)
        info.compress_type = zipfile.ZIP_DEFLATED
        with archive.open(info, "w", force_zip64=True) as handle:
            for _ in range(256):
                handle.write(bytes(1 << 20))
    return path


def test_zip_bomb_is_refused_before_torch_inflates_it(tmp_path):
    path = zip_bomb(tmp_path)
    assert path.stat().st_size < 1 << 20
    refused(path, r"archive entry '.*/data/\d+' is compressed \([\d,]+ bytes declaring 268,435,456\)")
    assert_cli_usage_error(tmp_path, path, "is compressed")
    # the file is a real bomb: torch.load alone (weights_only or not) inflates it into a 256 MiB tensor
    assert torch.load(path, weights_only=True)["state_dict"]["extra"].numel() == 1 << 26


def test_archive_entries_declaring_more_bytes_than_the_file_are_refused(tmp_path):
    """Two directory entries pointing at the same stored data (each would be read into memory again)."""
    path = tmp_path / "overlap.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("overlap/data/0", bytes(100_000))
        first = archive.filelist[0]
        clone = zipfile.ZipInfo("overlap/data/1", first.date_time)
        for attribute in ("compress_type", "CRC", "compress_size", "file_size", "header_offset", "flag_bits"):
            setattr(clone, attribute, getattr(first, attribute))
        archive.filelist.append(clone)
    refused(path, r"entries declare 200,\d{3} bytes but the file holds only [\d,]+ \(overlapping or forged entries\)")


def test_artifact_over_the_byte_cap_is_refused_and_the_cap_is_configurable(tmp_path, monkeypatch):
    path = tiny_artifact(tmp_path)
    monkeypatch.setenv("WSI_MAX_MODEL_BYTES", "1000")
    fix = "if you trust the file, raise WSI_MAX_MODEL_BYTES"
    refused(path, r"it holds [\d,]+ bytes, over the limit of 1,000", fix=fix)
    assert load_model(path, max_bytes=10_000_000).card.class_names == ["bg", "fg"]  # the keyword wins
    monkeypatch.setenv("WSI_MAX_MODEL_BYTES", "lots")
    with pytest.raises(ValueError, match="WSI_MAX_MODEL_BYTES='lots' is not a whole number"):
        load_model(path)


def test_parameter_cap_is_configurable_by_environment_and_keyword(tmp_path, monkeypatch):
    path = tiny_artifact(tmp_path)
    count = sum(t.numel() for t in UNet(base_channels=2, depth=1).state_dict().values())
    fix = "if you trust the file, raise WSI_MAX_MODEL_PARAMETERS"
    refused(path, rf"a model of {count:,} values, over the limit of {count - 1:,}", fix=fix, max_parameters=count - 1)
    monkeypatch.setenv("WSI_MAX_MODEL_PARAMETERS", str(count - 1))
    refused(path, rf"over the limit of {count - 1:,}", fix=fix)
    monkeypatch.setenv("WSI_MAX_MODEL_PARAMETERS", str(count))
    assert load_model(path).card.class_names == ["bg", "fg"]


# ------------------------------------------------------------------------------------ code execution


def test_pickle_that_runs_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": "wsi-unet-model", "format_version": 1, "config": RunsCode(marker)}, path)
    refused(path, r"not a readable model artifact \(UnpicklingError: .*\); the file may be truncated, tampered")
    assert_cli_usage_error(tmp_path, path, "UnpicklingError")
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the file really is hostile: a plain unpickle runs its code
    assert marker.exists()


def test_legacy_non_zip_torch_file_is_refused(tmp_path):
    """The pre-1.6 format declares storage sizes in the pickle and is never written by save_model."""
    payload = torch.load(tiny_artifact(tmp_path), weights_only=True)
    path = tmp_path / "legacy.pt"
    torch.save(payload, path, _use_new_zipfile_serialization=False)
    refused(path, r"not a readable model artifact \(not the zip archive torch.save writes")


def test_tampered_training_checkpoint_is_refused_and_never_runs(tmp_path, monkeypatch):
    import ray.train

    from pipeline.training import TrainConfig
    from pipeline.training.loop import LOCAL_CHECKPOINT, STATE_FILE, _load_state

    marker = tmp_path / "pwned"
    run_dir = tmp_path / "runs" / "tampered"
    state_file = run_dir / LOCAL_CHECKPOINT / STATE_FILE
    state_file.parent.mkdir(parents=True)
    torch.save({"model": {}, "epoch": 3, "optimizer": RunsCode(marker)}, state_file)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)  # as in a fresh in-process run
    cfg = TrainConfig(data=[str(tmp_path)], local_mode=True, run_dir=str(run_dir))
    with pytest.raises(ValueError) as info:
        _load_state(cfg)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{state_file}: refusing this training checkpoint"), message
    assert "UnpicklingError" in message and "delete it" in message
    assert not marker.exists()


def test_checkpoint_state_the_loop_saves_loads_with_weights_only(tmp_path):
    """What state.pt holds (weights, optimiser and GradScaler state, numbers, metrics) passes weights_only."""
    from pipeline.training.loop import read_state

    model = UNet(base_channels=2, depth=1, batch_norm=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.rand(1, 3, 64, 64)).mean().backward()
    optimizer.step()
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
             "epoch": 2, "best": 0.5, "best_epoch": 1, "metrics": {"epoch": 2, "val_dice": 0.5, "best_value": None}}
    torch.save(state, tmp_path / "state.pt")
    loaded = read_state(tmp_path / "state.pt")
    assert loaded["epoch"] == 2 and loaded["scaler"] == scaler.state_dict() and loaded["metrics"] == state["metrics"]
    assert loaded["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]


# -------------------------------------------------------------------------------- structure and types


def test_unknown_config_key_is_refused(tmp_path):
    path = hostile(tmp_path, edit_config={"activation": "gelu"})
    refused(path, r"config has unknown keys \['activation'\]")
    assert_cli_usage_error(tmp_path, path, r"config has unknown keys \['activation'\]")


@pytest.mark.parametrize(
    "changes, problem",
    [
        ({"config": DROP}, r"config is None, expected a JSON dict in a string"),
        ({"config": "{not json"}, r"config is '\{not json', expected a JSON dict"),
        ({"config": "[1, 2]"}, r"config is '\[1, 2\]', expected a JSON dict"),
        ({"config": "[" * 100_000}, r"config is '\[\[\[.*, expected a JSON dict"),  # too deep for json
        ({"edit_config": {"depth": DROP}}, r"config lacks keys \['depth'\]"),
    ],
    ids=["missing", "not_json", "not_a_dict", "nested_too_deep", "missing_key"],
)
def test_missing_or_malformed_config_is_refused(tmp_path, changes, problem):
    refused(hostile(tmp_path, **changes), problem)


@pytest.mark.parametrize(
    "version, problem, fix",
    [
        (2, r"format 2 is newer than this software \(which reads format 1\)", "upgrade this software to load it"),
        ("1", r"format_version is '1', not a supported version", "re-export it with unet.save_model"),
        (DROP, r"format_version is None, not a supported version", "re-export it with unet.save_model"),
        (0, r"format_version is 0, not a supported version", "re-export it with unet.save_model"),
        (True, r"format_version is True, not a supported version", "re-export it with unet.save_model"),
    ],
    ids=["newer", "string", "missing", "zero", "bool"],
)
def test_wrong_format_version_is_refused(tmp_path, version, problem, fix):
    refused(hostile(tmp_path, format_version=version), problem, fix=fix)


@pytest.mark.parametrize(
    "changes, problem",
    [
        ({"class_names": "bg,fg"}, r"class_names is 'bg,fg', expected a list of strings"),
        ({"class_names": ["bg", 1]}, r"class_names is \['bg', 1\], expected a list of strings"),
        ({"class_names": ["bg"]}, r"1 class_names for a model with 2 classes"),
        ({"state_dict": [torch.zeros(1)]}, r"state_dict is a list, expected a dict of names to tensors"),
        ({"state_dict": {"inc.block.0.weight": [1.0]}}, r"state_dict entry 'inc.block.0.weight' is a list"),
        ({"mpp": -0.5}, r"mpp is -0.5, expected null or a positive number"),
        ({"mpp": float("nan")}, r"mpp is nan"),
        ({"mpp": "0.5"}, r"mpp is '0.5'"),
        ({"metadata": "{oops"}, r"metadata is '\{oops', expected a JSON dict in a string"),
        ({"format": "other-model"}, r"not a U-Net model artifact \(no 'wsi-unet-model' header\)"),
        ({"edit_config": {"depth": "3"}}, r"config depth is '3', expected a whole number from 1 to 12"),
        ({"edit_config": {"base_channels": 0}}, r"config base_channels is 0, expected a whole number from 1 to 4096"),
        ({"edit_config": {"in_channels": 2.5}}, r"config in_channels is 2.5, expected a whole number"),
        ({"edit_config": {"batch_norm": 1}}, r"config batch_norm is 1, expected true or false"),
        ({"edit_config": {"padding": "full"}}, r"config padding is 'full', expected 'valid' or 'same'"),
        ({"edit_config": {"input_mean": ["a"]}}, r"config input_mean is \['a'\], expected a list of numbers"),
        ({"edit_config": {"input_std": [0.5, 0.5]}}, r"config is inconsistent: input_std needs 1 or 3 values, got 2"),
        ({"edit_config": {"halo_override": -1}}, r"config halo_override is -1, expected null or a whole number"),
    ],
    ids=["class_names_string", "class_names_not_strings", "class_names_count", "state_dict_list",
         "state_dict_entry_not_tensor", "mpp_negative", "mpp_nan", "mpp_string", "metadata_not_json", "format_other",
         "depth_string", "base_channels_zero", "in_channels_float", "batch_norm_int", "padding_unknown",
         "input_mean_strings", "input_std_length", "halo_override_negative"],
)  # fmt: skip
def test_wrong_field_types_and_ranges_are_refused(tmp_path, changes, problem):
    fix = "export it with unet.save_model" if "format" in changes else "re-export it with unet.save_model"
    refused(hostile(tmp_path, **changes), problem, fix=fix)


def mutated_state(tmp_path: Path, change) -> Path:
    payload = torch.load(tiny_artifact(tmp_path), weights_only=True)
    change(payload["state_dict"])
    torch.save(payload, tmp_path / "bad.pt")
    return tmp_path / "bad.pt"


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda s: s.update({"inc.block.0.weight": torch.zeros(2, 3, 5, 5)}),
         r"tensor 'inc.block.0.weight' is float32 \(2, 3, 5, 5\), the config needs float32 \(2, 3, 3, 3\)$"),
        (lambda s: s.pop("outc.bias"), r"tensor 'outc.bias' is missing"),
        (lambda s: s.update({"backdoor": torch.zeros(1)}), r"tensor 'backdoor' is not part of the architecture"),
        (lambda s: s.update({"outc.weight": s["outc.weight"].to(torch.int32)}),
         r"tensor 'outc.weight' is int32 \(2, 2, 1, 1\), the config needs float32"),
        (lambda s: s.update({"outc.weight": torch.empty(2, 2, 1, 1, device="meta")}),
         r"tensor 'outc.weight' is float32 \(2, 2, 1, 1\) without data \(meta\)"),
        (lambda s: s.update({"outc.weight": s["outc.weight"].to_sparse()}),
         r"tensor 'outc.weight' is float32 \(2, 2, 1, 1\) torch.sparse_coo"),
    ],
    ids=["shape", "missing", "unexpected", "integer_dtype", "meta_without_data", "sparse"],
)
def test_state_dict_that_does_not_match_the_config_is_refused(tmp_path, change, problem):
    message = refused(mutated_state(tmp_path, change), r"weights do not match the stored architecture: ")
    assert re.search(problem, message.removesuffix("; re-export it with unet.save_model")), message


# ------------------------------------------------------------------------------ valid files still load


def test_config_checks_cover_every_unetconfig_field():
    assert set(CONFIG_CHECKS) == {field.name for field in dataclasses.fields(UNetConfig)}


def test_batch_norm_buffers_and_half_precision_weights_load_exactly(tmp_path):
    torch.manual_seed(0)
    model = UNet(base_channels=2, depth=2, batch_norm=True).train()
    model(torch.rand(2, 3, 140, 140))  # moves the running statistics and num_batches_tracked
    loaded = load_model(save_model(model, tmp_path / "bn.pt"))
    expected, got = model.state_dict(), loaded.state_dict()
    assert list(got) == list(expected) and all(torch.equal(got[k], v) for k, v in expected.items())
    assert got["inc.block.1.num_batches_tracked"].item() == 1 and not loaded.training
    assert all(t.device.type == "cpu" and not t.is_meta for t in got.values())
    half = load_model(save_model(UNet(base_channels=2, depth=1).half(), tmp_path / "half.pt"))  # cast as before
    assert half.outc.weight.dtype == torch.float32


def test_bundled_model_loads_with_its_stored_weights():
    path = REPO / "models" / "nuclei-unet.pt"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    model = load_model(path)
    stored = torch.load(path, weights_only=True)["state_dict"]
    loaded = model.state_dict()
    assert len(stored) == len(loaded) and all(torch.equal(loaded[k], v) for k, v in stored.items())
