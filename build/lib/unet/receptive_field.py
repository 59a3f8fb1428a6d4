"""Measure a fully convolutional model's receptive radius (its halo) from the impulse response.

Formulas for the halo are easy to get wrong, and padded ("same") U-Nets have no closed form that
accounts for everything, so we measure it: the gradient of one output pixel with respect to the input
is non-zero exactly where that input influences it (the linearised impulse response). Max-pooling
and ReLU route gradients to a subset of their inputs, so we take the union over several random inputs
and over every phase of the pooling grid.
"""

from __future__ import annotations

import copy
import logging

import torch

logger = logging.getLogger(__name__)


def _input_extent(model: torch.nn.Module, image: torch.Tensor, out_y: int, out_x: int) -> tuple[int, int, int, int] | None:
    """Rows/cols (first, last) of the input that influence output pixel (out_y, out_x); None if no gradient."""
    image = image.clone().requires_grad_(True)
    output = model(image)
    (grad,) = torch.autograd.grad(output[0, :, out_y, out_x].sum(), image)
    support = grad[0].abs().sum(dim=0) > 0
    rows = torch.nonzero(support.any(dim=1)).flatten()
    cols = torch.nonzero(support.any(dim=0)).flatten()
    if rows.numel() == 0:  # every path through a dead ReLU: this input says nothing
        return None
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def measure_halo(model, seeds: int = 3, input_size: int | None = None) -> int:
    """Context pixels an aligned tile needs on each side, measured from the impulse response.

    A single output pixel's field depends on its phase p on the pooling grid (its output index mod
    alignment). A valid tile starts at phase 0 and ends at phase q = (output size - 1) mod alignment, so
    the context it needs is max_p(left_p - p) on the left and max_p(right_p - ((q - p) mod alignment)) on
    the right; for the paper's U-Net both are exactly the architectural halo. For "same" models, whose
    crop sets the phase, the conservative max_p(left_p, right_p).

    ``model`` must expose ``alignment``, ``is_valid_padding``, ``is_valid_input_size`` and
    ``output_size(n)`` (as :class:`unet.UNet` does). The input grows until the field fits inside it.
    """
    probe = copy.deepcopy(model).double().eval()
    alignment = model.alignment
    if input_size is None and model.is_valid_padding:
        input_size = model.input_size_for(model.valid_output_size(3 * alignment))
    size = input_size or 8 * alignment
    while True:
        size = _next_valid(model, size)
        out_size = model.output_size(size)
        offset = (size - out_size) // 2  # output pixel j sits over input pixel j + offset
        base = (out_size // 2) // alignment * alignment
        left, right = [0] * alignment, [0] * alignment
        touches_border = False
        generator = torch.Generator().manual_seed(0)
        for _ in range(seeds):
            image = torch.rand(1, model.config.in_channels, size, size, generator=generator, dtype=torch.float64)
            for phase in range(alignment):
                j = base + phase
                extent = _input_extent(probe, image, j, j)
                if extent is None:
                    continue
                y0, y1, x0, x1 = extent
                left[phase] = max(left[phase], j + offset - y0, j + offset - x0)
                right[phase] = max(right[phase], y1 - j - offset, x1 - j - offset)
                touches_border |= y0 == 0 or x0 == 0 or y1 == size - 1 or x1 == size - 1
        if model.is_valid_padding:
            last = (out_size - 1 - base) % alignment
            return max(
                max(left[p] - p for p in range(alignment)),
                max(right[p] - (last - p) % alignment for p in range(alignment)),
            )
        if not touches_border:
            logger.debug("measured halo with input %d", size)
            return max(left + right)
        size *= 2


def _next_valid(model, size: int) -> int:
    while not model.is_valid_input_size(size):
        size += 1
    return size
