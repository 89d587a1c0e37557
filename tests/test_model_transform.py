"""A loaded model's images are prepared as its checkpoint says, whatever form they come in, and a
fine-tuning start keeps its base's preprocessing."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

import vitkit
from helpers import tiny_config
from vitkit.convert import write_layout
from vitkit.data import eval_transform
from vitkit.delta import finetune_model
from vitkit.models.preprocessing import IMAGENET_MEAN, Preprocessing


def test_eval_transform_takes_pil_images_and_arrays_as_tensors():
    pixels = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    transform = eval_transform(
        Preprocessing((32, 32), "crop", 0.8, "bilinear", IMAGENET_MEAN, (0.2, 0.2, 0.2))
    )
    expected = transform(torch.from_numpy(pixels).permute(2, 0, 1))
    for image in (Image.fromarray(pixels), Image.fromarray(pixels).convert("RGBA"), pixels):
        torch.testing.assert_close(transform(image), expected, rtol=0, atol=0)


def test_a_finetuning_start_keeps_its_bases_preprocessing(tmp_path):
    write_layout(vitkit.VisionTransformer(tiny_config()), tmp_path / "base.pth", to="timm")
    base = vitkit.load(tmp_path / "base.pth", num_heads=4)  # timm's default: crop, ImageNet mean
    assert base.preprocessing.mean == IMAGENET_MEAN
    model = finetune_model(base, num_classes=3, img_size=48)
    assert model.preprocessing == base.preprocessing.replace(img_size=(48, 48))
    assert eval_transform(model)(torch.zeros(3, 64, 64, dtype=torch.uint8)).shape == (3, 48, 48)
