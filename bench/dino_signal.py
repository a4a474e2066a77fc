"""How much image signal a fresh DINO teacher carries, on real images (why DINO sits at ln K).

For a freshly initialised ViT-Tiny (the bundles' backbone) on ``--n`` training images of a
MedMNIST file, prints per pooling and head variant:

- the mean pairwise cosine similarity of the pooled embeddings (1 = every image looks the same);
- the std over images of the teacher's centred logits divided by the teacher temperature: the
  spread, in softmax units, of what the teacher tells the student. Well below 1, the centred
  teacher is uniform for every image and the student learns the uniform answer;
- the teacher's normalised entropy after centring (1 = uniform).

    python bench/dino_signal.py --data ../shared/data/medmnist/pneumoniamnist_28_trainval.npz
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
import torch.nn.functional as F


def signal(data: str, n: int, pooling: str, batch_norm: bool, temp: float, seed: int = 0) -> tuple[float, float, float]:
    from medssl.bundles import data_overrides
    from medssl.models import ViT
    from medssl.tasks import DINOTask

    fit = data_overrides(data)
    with np.load(data, mmap_mode="r") as npz:
        images = torch.as_tensor(np.asarray(npz["train_images"][:n]), dtype=torch.float32) / 255.0
    images = images[:, None]  # (N, 1, *S), as the pipeline gives them: [0, 1]
    torch.manual_seed(seed)
    vit = ViT(fit["spatial_dims"], 1, patch_size=fit["patch_size"], size="tiny")
    task = DINOTask(vit, pooling=pooling, head_batch_norm=batch_norm).train()
    with torch.no_grad():
        z = task.teacher.embed(images, pooling)
        logits = task.teacher_head(z)
        zn = F.normalize(z, dim=-1)
        cos = (zn @ zn.T)[~torch.eye(len(z), dtype=torch.bool)].mean()
        centred = (logits - logits.mean(0)) / temp  # the centre once it has caught up with the batch mean
        q = centred.softmax(-1)
        entropy = -(q * q.clamp_min(1e-12).log()).sum(-1).mean() / math.log(q.shape[1])
    return float(cos), float(centred.std(0).mean()), float(entropy)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a MedMNIST .npz")
    p.add_argument("--n", type=int, default=256, help="images")
    p.add_argument("--teacher-temp", type=float, default=0.04, help="the teacher temperature at the start of training")
    args = p.parse_args()
    print("| pooling | head | embedding cosine | teacher logit spread / temperature | teacher entropy |")
    print("|---|---|---:|---:|---:|")
    for pooling in ("cls", "mean"):
        for bn in (False, True):
            cos, spread, entropy = signal(args.data, args.n, pooling, bn, args.teacher_temp)
            print(f"| {pooling} | {'BatchNorm' if bn else 'plain'} | {cos:.4f} | {spread:.3f} | {entropy:.3f} |", flush=True)


if __name__ == "__main__":
    main()
