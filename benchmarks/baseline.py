"""The hand-written baseline that vitembed is measured against: the seed's recipe, as written.

The seed's `VitInputLayer` class (verbatim in spirit: conv patch embedding, class token by
`repeat`, position embedding), torchvision's `Resize((S, S))` + `ToTensor` + `Normalize`, one
image at a time, `np.save` of each z0. Deliberately independent of vitembed.

    python benchmarks/baseline.py IN_DIR OUT_DIR [--emb-dim 384 --num-patch-row 16]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torchvision.transforms as T
from PIL import Image


class VitInputLayer(nn.Module):
    def __init__(self, in_channels: int = 3, emb_dim: int = 384, num_patch_row: int = 2, image_size: int = 32):
        super().__init__()
        self.in_channels = in_channels
        self.emb_dim = emb_dim
        self.num_patch_row = num_patch_row
        self.image_size = image_size
        self.num_patch = self.num_patch_row**2
        self.patch_size = int(self.image_size // self.num_patch_row)
        self.patch_emb_layer = nn.Conv2d(
            in_channels=self.in_channels, out_channels=self.emb_dim,
            kernel_size=self.patch_size, stride=self.patch_size,
        )
        self.cls_token = nn.Parameter(torch.randn(1, 1, emb_dim))
        self.pos_emb = nn.Parameter(torch.randn(1, self.num_patch + 1, emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z_0 = self.patch_emb_layer(x)  # (B, C, H, W) -> (B, D, H/P, W/P)
        z_0 = z_0.flatten(2)  # -> (B, D, Np)
        z_0 = z_0.transpose(1, 2)  # -> (B, Np, D)
        z_0 = torch.cat([self.cls_token.repeat(repeats=(x.size(0), 1, 1)), z_0], dim=1)  # -> (B, Np+1, D)
        z_0 = z_0 + self.pos_emb
        return z_0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs")
    parser.add_argument("outputs")
    parser.add_argument("--emb-dim", type=int, default=384)
    parser.add_argument("--num-patch-row", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    layer = VitInputLayer(3, args.emb_dim, args.num_patch_row, args.image_size).eval()
    transform = T.Compose([
        T.Resize((args.image_size, args.image_size)),
        T.ToTensor(),
        T.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    ])
    os.makedirs(args.outputs, exist_ok=True)
    names = sorted(n for n in os.listdir(args.inputs) if n.lower().endswith((".jpg", ".jpeg", ".png")))
    with torch.no_grad():
        for name in names:
            image = Image.open(os.path.join(args.inputs, name)).convert("RGB")
            x = transform(image).unsqueeze(0)  # (1, 3, S, S)
            z0 = layer(x)[0]  # (Np+1, D)
            np.save(os.path.join(args.outputs, os.path.splitext(name)[0] + ".npy"), z0.numpy())
    print(f"baseline: {len(names)} images", file=sys.stderr)


if __name__ == "__main__":
    main()
