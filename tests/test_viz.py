"""Tests for minidalle.viz: the one image normaliser (shared with the judge) and the grid writer."""

import numpy as np
import pytest
import torch

from minidalle import data
from minidalle.data import Obj, Scene
from minidalle.errors import DataError
from minidalle.viz import as_uint8_hwc, save_grid


def test_every_form_of_one_image_reads_the_same():
    image = data.render(Scene((Obj("diamond", "orange", "big", 0.5, 0.5),), "centre"), 16)  # uint8 (16, 16, 3)
    t = torch.from_numpy(image)
    forms = {
        "uint8 numpy": image,
        "uint8 torch": t,
        "uint8 torch (3, H, W)": t.permute(2, 0, 1),
        "float 0..1 numpy": image.astype(np.float32) / 255,
        "float 0..1 torch (3, H, W), with grad": (t.permute(2, 0, 1).float() / 255).requires_grad_(),
        "float 0..255 numpy": image.astype(np.float64),  # turned all white before the two normalisers merged
        "float 0..255 torch": t.float(),
        "bfloat16 0..255 torch": t.to(torch.bfloat16),  # exact: bfloat16 holds integers up to 256
        "int64 0..255 numpy": image.astype(np.int64),
    }
    for name, form in forms.items():
        out = as_uint8_hwc(form)
        assert out.dtype == np.uint8 and np.array_equal(out, image), name


def test_values_are_rounded_clipped_and_nan_is_black():
    a = np.array([[[0.5, 1.0, 0.0]]], np.float32)  # max <= 1: read as 0..1
    assert as_uint8_hwc(np.broadcast_to(a, (2, 2, 3))).tolist()[0][0] == [128, 255, 0]
    b = np.array([[[-20.0, 127.6, 300.0]]])  # max > 1: read as 0..255
    assert as_uint8_hwc(np.broadcast_to(b, (2, 2, 3))).tolist()[0][0] == [0, 128, 255]
    c = np.array([[[np.nan, 0.5, 1.0]]])
    assert as_uint8_hwc(np.broadcast_to(c, (2, 2, 3))).tolist()[0][0] == [0, 128, 255]


def test_not_one_rgb_image_raises_data_error():
    for bad in (np.zeros((8, 8)), np.zeros((8, 8, 4)), np.zeros((2, 8, 8, 3)), np.zeros((8, 8, 1))):
        with pytest.raises(DataError):
            as_uint8_hwc(bad)


def test_save_grid_writes_a_png(tmp_path):
    images = [data.render(Scene((Obj("circle", c, "big", 0.5, 0.5),), "centre"), 16) for c in ("red", "blue", "white")]
    path = save_grid([torch.from_numpy(im).float() for im in images], tmp_path / "sub" / "grid.png",
                     ["a red disc", "a blue circle", "a white circle"], ncols=2, title="three")
    assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("**/*.tmp.png"))  # the temporary file was renamed away
