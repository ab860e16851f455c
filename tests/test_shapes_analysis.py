"""lverse.shapes.analysis (bench/shapes_codes.py's measurements) on images and codes whose answers are known."""
from __future__ import annotations

import math

import pytest
import torch

import lverse.shapes.analysis as codes_bench
from lverse.shapes.scenes import COLOURS

RED, BLUE = list(COLOURS).index("red"), list(COLOURS).index("blue")


def paint(img: torch.Tensor, colour: str, rows: slice, cols: slice) -> None:
    img[:, rows, cols] = torch.tensor(COLOURS[colour], dtype=torch.float32)[:, None, None] / 255


def test_cells_read_their_object_colour_and_emptiness() -> None:
    img = torch.ones(1, 3, 64, 64)
    paint(img[0], "red", slice(16, 24), slice(24, 32))  # the whole of cell (2, 3)
    paint(img[0], "blue", slice(40, 44), slice(40, 44))  # a quarter of cell (5, 5)
    paint(img[0], "blue", slice(0, 2), slice(56, 58))  # 4 pixels of cell (0, 7): too few for a colour
    cells = codes_bench.cell_colours(img * 2 - 1, 8)[0]  # [-1, 1] images are accepted too
    assert cells[2 * 8 + 3] == RED and cells[5 * 8 + 5] == BLUE and cells[7] == -1
    assert int((cells >= 0).sum()) == 2
    empty = codes_bench.empty_cells(img, 8)[0]
    assert not empty[2 * 8 + 3] and not empty[5 * 8 + 5] and not empty[7]
    assert int(empty.sum()) == 61


def test_colour_given_code_entropies() -> None:
    colours = torch.tensor([[RED, RED, BLUE, BLUE, -1]])
    telling = codes_bench.colour_given_code(torch.tensor([[1, 1, 2, 2, 7]]), colours)
    assert telling["cells"] == 4 and telling["codes"] == 2
    assert telling["H_colour"] == pytest.approx(math.log(2))
    assert telling["H_colour_given_code"] == pytest.approx(0.0) and telling["majority"] == 1.0
    silent = codes_bench.colour_given_code(torch.tensor([[3, 3, 3, 3, 3]]), colours)
    assert silent["H_colour_given_code"] == pytest.approx(math.log(2)) and silent["majority"] == 0.5


def test_probe_finds_colour_only_where_it_is() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 6, (600,), generator=g)
    telling = torch.nn.functional.one_hot(labels, 6).float() + 0.1 * torch.randn(600, 6, generator=g)
    assert codes_bench.probe_accuracy(telling, labels) > 0.95
    assert codes_bench.probe_accuracy(torch.randn(600, 6, generator=g), labels) < 0.4
