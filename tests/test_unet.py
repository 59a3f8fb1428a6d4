"""The U-Net's architecture and geometry: the paper's sizes, the halo, valid sizes, init, input contract."""

import pytest
import torch

from unet import UNet, measure_halo


def test_paper_configuration_maps_572_to_388_with_halo_92():
    model = UNet(in_channels=1, num_classes=2)  # the paper's: 64 base channels, depth 4, valid padding
    assert model.output_size(572) == 388
    assert model.input_size_for(388) == 572
    assert model.halo == 92 and model.alignment == 16


def test_paper_forward_pass_really_gives_388():
    model = UNet(in_channels=1, num_classes=2, base_channels=2)  # same geometry, tiny widths
    with torch.no_grad():
        assert model(torch.rand(1, 1, 572, 572)).shape == (1, 2, 388, 388)


@pytest.mark.parametrize(
    "config",
    [dict(depth=1), dict(depth=2), dict(depth=3), dict(depth=4), dict(depth=3, up_mode="bilinear", batch_norm=True)],
    ids=["depth1", "depth2", "depth3", "depth4", "depth3-bilinear-bn"],
)
def test_halo_matches_impulse_measurement(config):
    torch.manual_seed(0)  # 2-channel layers: some random inits leave a path dead (no gradient reaches the halo)
    model = UNet(base_channels=2, **config).eval()
    assert measure_halo(model) == model.halo


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_every_reported_valid_size_runs_and_others_are_rejected(depth):
    model = UNet(base_channels=2, depth=depth).eval()
    out = model.valid_output_size(37)
    assert out >= 37 and model.valid_output_size(out) == out
    size = model.input_size_for(out)
    with torch.no_grad():
        assert model(torch.rand(1, 3, size, size)).shape[-1] == out
    with pytest.raises(ValueError, match="not valid"):
        model.input_size_for(out + 1)


def test_same_padding_measures_its_halo_and_accepts_an_override():
    model = UNet(base_channels=2, depth=2, padding="same").eval()
    assert model.output_size(64) == 64
    assert model.halo > 0 and model.halo == measure_halo(model)
    assert UNet(base_channels=2, depth=2, padding="same", halo_override=40).halo == 40


def test_up_convolution_halves_channels_and_init_is_he_normal():
    model = UNet(base_channels=16, depth=2)
    up = model.ups[0].up
    assert (up.in_channels, up.out_channels) == (64, 32)
    conv = model.inc.block[0]
    fan_in = conv.in_channels * 9
    assert abs(conv.weight.std().item() - (2 / fan_in) ** 0.5) < 0.25 * (2 / fan_in) ** 0.5
    assert torch.count_nonzero(conv.bias) == 0


def test_normalisation_lives_in_the_model_as_buffers():
    model = UNet(base_channels=2, depth=1, input_mean=(0.1, 0.2, 0.3), input_std=(0.5, 0.5, 0.5))
    buffers = dict(model.named_buffers())
    assert torch.allclose(buffers["input_mean"].flatten(), torch.tensor([0.1, 0.2, 0.3]))
    assert "input_mean" in model.state_dict()


def test_bad_configuration_is_rejected_with_a_message():
    with pytest.raises(ValueError, match="padding"):
        UNet(padding="reflect")
    with pytest.raises(ValueError, match="input_mean"):
        UNet(in_channels=3, input_mean=(0.1, 0.2))
