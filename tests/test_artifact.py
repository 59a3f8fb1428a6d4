"""Model artifacts: round trip of weights, config and metadata; safe loading; clear errors."""

import pytest
import torch

from conftest import varied_unet
from unet import ModelArtifactError, UNet, load_model, save_model


def test_round_trip_restores_weights_config_and_metadata(tmp_path):
    model = varied_unet(depth=2, up_mode="bilinear", batch_norm=True, input_mean=(0.7, 0.6, 0.8))
    path = save_model(model, tmp_path / "m.pt", class_names=["bg", "nucleus", "stroma"], mpp=0.5, data="nuclei", epochs=3)
    loaded = load_model(path)
    assert loaded.config == model.config and not loaded.training
    assert loaded.card.class_names == ["bg", "nucleus", "stroma"] and loaded.card.mpp == 0.5
    assert loaded.card.metadata == {"data": "nuclei", "epochs": 3} and len(loaded.card.checksum) == 64
    x = torch.rand(1, 3, 92, 92)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_artifact_loads_with_weights_only(tmp_path):
    path = save_model(UNet(base_channels=2, depth=1), tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)  # raises if anything needs arbitrary unpickling
    assert payload["format"] == "wsi-unet-model"


def test_truncated_artifact_gets_a_clear_error(tmp_path):
    path = save_model(UNet(base_channels=2, depth=1), tmp_path / "m.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelArtifactError, match="m.pt: not a readable model artifact"):
        load_model(path)


def test_file_that_is_not_an_artifact_gets_a_clear_error(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ModelArtifactError, match="notes.txt"):
        load_model(text)
    other = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(ModelArtifactError, match="not a U-Net model artifact"):
        load_model(other)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_model(tmp_path / "missing.pt")
