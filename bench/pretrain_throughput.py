"""Pretraining speed and memory: medssl's MAE against MONAI's MaskedAutoEncoderViT, and windows at 128^3.

Part 1, same size for all (embed 192, depth 6, heads 6, MLP 768, decoder 96 wide / 2 blocks /
6 heads, mask ratio 0.75, global attention, MSE on masked patches, AdamW), timed in one process,
alternating model by model round by round so both see the same machine state:
2D 28x28 patch 4 batch 128; 3D 28^3 patch 4 batch 32; 3D 64^3 patch 8 batch 16. MONAI runs twice:
in bf16 autocast like ours (with a one-line fix, see ``MonaiMAE``) and in fp32 as shipped, since
its forward fails under autocast.

Part 2, medssl only, 3D 128^3 patch 8 (4096 tokens): global attention vs ViTDet windows (4^3
tokens, global every 3rd block; the decoder attends within windows), on random data and on CT
phantom patches with background dropping (air tokens skipped).

Peak memory is measured per model in a fresh subprocess: the peak RSS during three training steps
(``VmHWM`` after resetting it through ``/proc/self/clear_refs``) minus the RSS before them. Model FLOPs come from
``torch.utils.flop_counter`` on one training step; utilisation (MFU) is relative to the
machine's measured bf16 (or fp32) 2048^2 matrix-product rate. Mixed precision: bf16 autocast
where the CPU supports it (AVX512-BF16/AMX), as the trainer's ``amp="auto"`` does.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings

import torch

from report import publish

warnings.filterwarnings("ignore")

SIZE = dict(embed=192, depth=6, heads=6, decoder=96, decoder_depth=2, mask=0.75)
CONFIGS = {  # name: spatial_dims, image size, patch, batch
    "2D 28 p4": (2, 28, 4, 128),
    "3D 28 p4": (3, 28, 4, 32),
    "3D 64 p8": (3, 64, 8, 16),
}
BIG = (3, 128, 8, 2)  # 128^3, patch 8, batch 2


def _autocast(amp: bool = True):
    from medssl.engine.trainer import autocast_dtype

    dtype = autocast_dtype("cpu", "auto") if amp else None
    return torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None), dtype


class MonaiMAE(torch.nn.Module):
    """MONAI's MaskedAutoEncoderViT with the same loss as ours (MSE on the masked patches)."""

    def __init__(self, dims, size, patch):
        super().__init__()
        from monai.networks.nets import MaskedAutoEncoderViT

        self.patch = (patch,) * dims
        self.net = MaskedAutoEncoderViT(in_channels=1, img_size=size, patch_size=patch, hidden_size=SIZE["embed"],
                                        mlp_dim=4 * SIZE["embed"], num_layers=SIZE["depth"], num_heads=SIZE["heads"],
                                        masking_ratio=SIZE["mask"], decoder_hidden_size=SIZE["decoder"],
                                        decoder_mlp_dim=4 * SIZE["decoder"], decoder_num_layers=SIZE["decoder_depth"],
                                        decoder_num_heads=6, spatial_dims=dims)
        # MONAI 1.6's forward scatters the (autocast bf16) decoder input into fp32 mask tokens and
        # fails under autocast; hand the scatter fp32 (the decoder's linear layers recast to bf16).
        self.net.decoder_embed.register_forward_hook(lambda module, args, out: out.float())

    def forward(self, batch):
        from medssl.tasks import patchify

        pred, mask = self.net(batch["image"])  # (B, N, P), (B, N) with 1 = masked
        err = (pred.float() - patchify(batch["image"], self.patch)).pow(2).mean(-1)
        return {"loss": (err * mask).sum() / mask.sum()}


def build(kind: str, dims: int, size: int, patch: int, window: bool = False, background: bool = False):
    torch.manual_seed(0)
    if kind.startswith("monai"):
        model = MonaiMAE(dims, size, patch)
        model.amp = kind == "monai"  # "monai fp32": as shipped, since its forward fails under autocast
        return model
    from medssl.models import ViT
    from medssl.tasks import MAETask

    vit = ViT(dims, 1, patch_size=patch, embed_dim=SIZE["embed"], depth=SIZE["depth"], num_heads=SIZE["heads"],
              window_size=4 if window else None, global_every=3)
    return MAETask(vit, mask_ratio=SIZE["mask"], decoder_dim=SIZE["decoder"], decoder_depth=SIZE["decoder_depth"],
                   decoder_heads=6, norm_pix_loss=False, background_threshold=0.0 if background else None)


def batch_for(dims: int, size: int, n: int, ct: bool = False) -> dict:
    if not ct:
        return {"image": torch.rand(n, 1, *[size] * dims, generator=torch.Generator().manual_seed(0))}
    from medssl.data.intensity import HUWindow
    from medssl.data.synthetic import make_ct_phantom

    patches = []
    for i in range(n):  # an abdominal phantom at 1.5 mm: about half of each 128^3 patch is air
        vol = make_ct_phantom(i, shape=(size + 32, size + 32, size), spacing=(1.5, 1.5, 2.0), lesion=True).volume
        patches.append(HUWindow("abdomen")(torch.as_tensor(vol, dtype=torch.float32)[None, 16:16 + size, 16:16 + size]))
    return {"image": torch.stack(patches).float()}


def step_fn(model, batch):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ctx, _ = _autocast(getattr(model, "amp", True))

    def step():
        with ctx:
            loss = model(batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def flops_per_step(model, batch) -> float:
    """Model FLOPs of one forward+backward. The counter has no formula for PyTorch's CPU flash
    attention, so attention is counted through the written-out path (same FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    from medssl.models import blocks

    ctx, _ = _autocast(getattr(model, "amp", True))
    counter = FlopCounterMode(display=False)
    short, blocks.CPU_SHORT_TOKENS = blocks.CPU_SHORT_TOKENS, 1 << 30
    try:
        with counter, ctx:
            model(batch)["loss"].backward()
    finally:
        blocks.CPU_SHORT_TOKENS = short
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def peak_matmul_gflops() -> float:
    _, dtype = _autocast()
    a = torch.randn(2048, 2048, dtype=dtype or torch.float32)
    for _ in range(3):
        a @ a
    t = time.perf_counter()
    for _ in range(10):
        a @ a
    return 10 * 2 * 2048**3 / (time.perf_counter() - t) / 1e9


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def memory_probe(spec: str) -> dict:
    kind, dims, size, patch, n, window, background, ct = json.loads(spec)
    model = build(kind, dims, size, patch, window, background)
    batch = batch_for(dims, size, n, ct)
    return {"peak_mb": peak_rss_mb(step_fn(model, batch), 3)}


def peak_rss_mb(step, n: int) -> float:
    """Peak resident memory (MB) that ``n`` calls of ``step`` add to this process."""
    base = _status_mb("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    for _ in range(n):
        step()
    return _status_mb("VmHWM:") - base


def probe(spec: list, script: str = __file__) -> float:
    """Run ``script --memory-probe spec`` in a fresh process; its peak memory in MB."""
    out = subprocess.run([sys.executable, script, "--memory-probe", json.dumps(spec)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if out.returncode:
        sys.exit(f"memory probe {spec} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def bench_args(doc: str, memory_probe, steps: int, extra=None) -> argparse.Namespace:
    """The command line the speed benchmarks share. A ``--memory-probe SPEC`` call (how :func:`probe`
    runs one configuration in a fresh process) prints ``memory_probe(SPEC)`` as JSON and exits."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=steps, help="steps per round")
    p.add_argument("--markdown", default=None, help="write the tables into this file between the markers")
    p.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    if extra is not None:
        extra(p)
    args = p.parse_args()
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe)))
        sys.exit(0)
    return args


def alternate(models: dict, batch: dict, rounds: int, steps: int) -> dict[str, float]:
    """Samples/s of each model: median over ``rounds``, the models taking turns within a round."""
    steps_fns = {k: step_fn(m, batch) for k, m in models.items()}
    for fn in steps_fns.values():  # warm-up (allocator, autocast caches)
        fn()
        fn()
    times = {k: [] for k in models}
    for _ in range(rounds):
        for k, fn in steps_fns.items():
            t = time.perf_counter()
            for _ in range(steps):
                fn()
            times[k].append(time.perf_counter() - t)
    n = len(batch["image"])
    return {k: n * steps / statistics.median(v) for k, v in times.items()}


def main() -> None:
    args = bench_args(__doc__, memory_probe, steps=3,
                      extra=lambda p: p.add_argument("--skip-big", action="store_true", help="skip the 128^3 part"))
    torch.set_num_threads(os.cpu_count() or 1)
    _, dtype = _autocast()
    peak = peak_matmul_gflops()
    precision = str(dtype).replace("torch.", "") if dtype else "float32"
    print(f"{precision} 2048^2 matmul: {peak:.0f} GFLOP/s", flush=True)

    rows = []
    for name, (dims, size, patch, n) in CONFIGS.items():
        models = {k: build(k, dims, size, patch) for k in ("medssl", "monai", "monai fp32")}
        batch = batch_for(dims, size, n)
        speed = alternate(models, batch, args.rounds, args.steps)
        for kind in models:
            flops = flops_per_step(models[kind], batch)
            mem = probe([kind, dims, size, patch, n, False, False, False])
            mfu = flops * speed[kind] / n / (peak * 1e9)
            rows.append((name, n, kind, speed[kind], flops / n / 1e9, mfu, mem))
            print(f"{name:9} {kind:10} {speed[kind]:8.1f} samples/s  {flops / n / 1e9:6.2f} GFLOP/sample  MFU {mfu:5.1%}  "
                  f"peak {mem:7.0f} MB", flush=True)
    table = [f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, autocast {precision}; "
             f"measured {precision} 2048^2 matmul peak {peak:.0f} GFLOP/s (the MFU denominator). "
             f"Median of {args.rounds} rounds x {args.steps} steps, models alternating.", "",
             "| config | batch | model | samples/s | GFLOP/sample (fwd+bwd) | MFU | peak memory (MB) | medssl / this speed | medssl / this memory |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for i in range(0, len(rows), 3):
        ours = rows[i]
        for r in rows[i:i + 3]:
            ratio = " | " if r is ours else f"{ours[3] / r[3]:.2f}x | {ours[6] / r[6]:.2f}x"
            table.append(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.1f} | {r[4]:.2f} | {r[5]:.1%} | {r[6]:.0f} | {ratio} |")

    if not args.skip_big:
        dims, size, patch, n = BIG
        variants = {"global attention": (False, False, False), "windows": (True, False, False),
                    "global attention, CT phantom": (False, False, True),
                    "global attention + background dropping, CT phantom": (False, True, True),
                    "windows, CT phantom": (True, False, True), "windows + background dropping, CT phantom": (True, True, True)}
        big = []
        for ct in (False, True):
            names = [k for k, v in variants.items() if v[2] == ct]
            models = {k: build("medssl", dims, size, patch, variants[k][0], variants[k][1]) for k in names}
            batch = batch_for(dims, size, n, ct)
            speed = alternate(models, batch, max(3, args.rounds // 2), 1)
            for k in names:
                flops = flops_per_step(models[k], batch)
                mem = probe(["medssl", dims, size, patch, n, variants[k][0], variants[k][1], ct])
                big.append((k, speed[k], flops / n / 1e9, flops * speed[k] / n / (peak * 1e9), mem))
                print(f"128^3 {k:45} {speed[k]:6.2f} samples/s  {flops / n / 1e9:7.1f} GFLOP/sample  peak {mem:7.0f} MB", flush=True)
        base = {r[0]: r[1] for r in big}
        table += ["", f"3D 128^3, patch 8 (4096 tokens), batch {n}, medssl MAE of the same size; windows of 4^3 tokens, "
                  "global attention in blocks 3 and 6; the decoder attends within windows.", "",
                  "| variant | samples/s | GFLOP/sample (fwd+bwd) | MFU | peak memory (MB) | speed vs global attention |",
                  "|---|---:|---:|---:|---:|---:|"]
        for k, s, g, m, mem in big:
            ref = base["global attention, CT phantom" if "CT" in k else "global attention"]
            table.append(f"| {k} | {s:.2f} | {g:.1f} | {m:.1%} | {mem:.0f} | {s / ref:.2f}x |")
    publish("\n".join(table), "pretrain_throughput", args.markdown)


if __name__ == "__main__":
    main()
