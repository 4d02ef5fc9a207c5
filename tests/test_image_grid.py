"""``image_grid`` (torchvision's make_grid underneath): the layout of validation and report grids."""

import numpy as np

from src.training.base import image_grid


def _images(n: int, h: int = 3, w: int = 2) -> np.ndarray:
    return np.arange(n * h * w * 3, dtype=np.uint8).reshape(n, h, w, 3) % 250


def test_images_sit_row_major_in_cols_columns_with_white_padding():
    ims = _images(5)
    grid = image_grid(list(ims), cols=3, scale=2, pad=1)
    assert grid.shape == (2 * (6 + 1) + 1, 3 * (4 + 1) + 1, 3) and grid.dtype == np.uint8
    for i, im in enumerate(ims):
        r, c = divmod(i, 3)
        cell = grid[1 + r * 7 : 1 + r * 7 + 6, 1 + c * 5 : 1 + c * 5 + 4]
        np.testing.assert_array_equal(cell, np.kron(im, np.ones((2, 2, 1), dtype=np.uint8)))
    assert (grid[0] == 255).all() and (grid[:, 0] == 255).all() and (grid[7] == 255).all()
    assert (grid[8:, 11:] == 255).all()  # the cell after the last image is blank


def test_fewer_images_than_columns_and_a_lone_image_keep_the_full_width_and_border():
    assert image_grid(_images(2), cols=8, scale=1, pad=2).shape == (3 + 4, 8 * (2 + 2) + 2, 3)
    lone = image_grid(_images(1), cols=1, scale=4, pad=2)
    assert lone.shape == (12 + 4, 8 + 4, 3) and (lone[:2] == 255).all() and (lone[:, -2:] == 255).all()
    assert lone.flags["C_CONTIGUOUS"]
