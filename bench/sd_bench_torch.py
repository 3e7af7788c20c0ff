"""The torch side of bench/sd_bench.py: makes the random SD 1.5 folders and times diffusers on them.

Run with an interpreter that has torch and diffusers (the project never imports torch); normally
bench/sd_bench.py calls it with --torch_python. By hand:

    /tmp/oracle/venv/bin/python bench/sd_bench_torch.py --make --folder /tmp/sd15_random
    /tmp/oracle/venv/bin/python bench/sd_bench_torch.py --time --folder /tmp/sd15_random \\
        [--sizes 32 64] [--repeats 3] [--threads 2]

--make: diffusers' UNet2DConditionModel and AutoencoderKL with Stable Diffusion 1.5's configs,
random init (torch.manual_seed(0)), save_pretrained (float32 safetensors) to FOLDER/unet and
FOLDER/vae (about 3.4 GB + 0.3 GB).
--time: from_pretrained of each (time and peak RSS, each in a fresh process), then seconds per
UNet call on batch 2 (a CFG pair) at each latent size and per VAE decode of one 64x64 latent,
and, alone, scaled_dot_product_attention at the UNet's top level (as sd_bench.py), under
torch.inference_mode(), float32, `--threads` intra-op threads; writes FOLDER/results/torch.json
and the outputs for the first input of each row (.npy, NHWC) for sd_bench.py to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

UNET = dict(sample_size=64, in_channels=4, out_channels=4, center_input_sample=False,
            flip_sin_to_cos=True, freq_shift=0,
            down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, downsample_padding=1,
            mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
            cross_attention_dim=768, attention_head_dim=8)
VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
           up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
           layers_per_block=2, act_fn="silu", latent_channels=4, norm_num_groups=32,
           sample_size=512, scaling_factor=0.18215)


def peak_rss_gib() -> float:
    """VmHWM of this process (the most resident memory it has had), GiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def make(folder: str) -> None:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    for name, cls, cfg in (("unet", UNet2DConditionModel, UNET), ("vae", AutoencoderKL, VAE)):
        torch.manual_seed(0)
        t0 = time.perf_counter()
        model = cls(**cfg)
        model.save_pretrained(os.path.join(folder, name), safe_serialization=True)
        n = sum(p.numel() for p in model.parameters())
        print(f"{name}: {n / 1e6:.1f}M parameters saved to {folder}/{name} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        del model


def load_only(folder: str, name: str) -> None:
    """Prints {load_s, rss_before_gib, peak_rss_gib, touch_s, peak_rss_touched_gib} of
    from_pretrained in this fresh process (touched: after reading every parameter once)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    torch.set_num_threads(1)
    cls = UNet2DConditionModel if name == "unet" else AutoencoderKL
    before = peak_rss_gib()
    t0 = time.perf_counter()
    model = cls.from_pretrained(os.path.join(folder, name), torch_dtype=torch.float32)
    dt, peak = time.perf_counter() - t0, peak_rss_gib()
    # from_pretrained may leave the tensors on the memory-mapped file, paged in by the first call:
    # reading every parameter once gives the resident cost.
    t0 = time.perf_counter()
    with torch.inference_mode():
        sum(float(p.abs().sum()) for p in model.parameters())
    print(json.dumps(dict(load_s=dt, rss_before_gib=before, peak_rss_gib=peak,
                          touch_s=time.perf_counter() - t0, peak_rss_touched_gib=peak_rss_gib())))


def inputs(size: int, batch: int = 2):
    """The benchmark's inputs, NHWC numpy (seeded; sd_bench.py makes the same ones)."""
    rng = np.random.RandomState(0)
    sample = rng.standard_normal((batch, size, size, 4)).astype(np.float32)    # [B, h, w, 4]
    context = rng.standard_normal((batch, 77, 768)).astype(np.float32)         # [B, 77, 768]
    return sample, np.full((batch,), 500, np.int64), context


def timed(fn, repeats: int):
    """(first-call seconds, [seconds of each later call], the first call's output)."""
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, times, out


def time_all(a) -> None:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    torch.set_num_threads(a.threads)
    res = dict(torch=torch.__version__, threads=torch.get_num_threads(),
               loadavg_before=os.getloadavg(), rows=[], loads={})
    out_dir = os.path.join(a.folder, "results")
    os.makedirs(out_dir, exist_ok=True)
    for name in ("unet", "vae"):
        p = subprocess.run([sys.executable, __file__, "--load_only", name, "--folder", a.folder],
                           capture_output=True, text=True, check=True)
        res["loads"][name] = json.loads(p.stdout.strip().splitlines()[-1])
        print(name, "load", res["loads"][name], flush=True)
    nchw = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))  # noqa: E731
    with torch.inference_mode():
        unet = UNet2DConditionModel.from_pretrained(os.path.join(a.folder, "unet")).eval()
        for size in a.sizes:
            sample, t, context = inputs(size)
            args = (nchw(sample), torch.from_numpy(t), torch.from_numpy(context))
            first, times, out = timed(lambda: unet(*args).sample, a.repeats)
            out = out.numpy().transpose(0, 2, 3, 1)
            np.save(os.path.join(out_dir, f"torch_unet_{size}.npy"), out)
            res["rows"].append(dict(what="UNet step (CFG pair)", shape=f"2x{size}x{size}x4",
                                    first_s=first, times=times))
            print(res["rows"][-1], flush=True)
        unet = None  # free it before the VAE
        for size in a.sizes:  # as sd_bench.attention_inputs; torch's layout is [B, heads, L, D]
            rng = np.random.RandomState(1)
            q, k, v = (torch.from_numpy(rng.standard_normal((2, size * size, 8, 40)).astype(
                np.float32)).transpose(1, 2) for _ in range(3))
            sdpa = torch.nn.functional.scaled_dot_product_attention
            first, times, _ = timed(lambda: sdpa(q, k, v), a.repeats)
            res["rows"].append(dict(what="self-attention, top level (5 per UNet step)",
                                    shape=f"2x{size * size}x8x40", first_s=first, times=times))
            print(res["rows"][-1], flush=True)
        vae = AutoencoderKL.from_pretrained(os.path.join(a.folder, "vae")).eval()
        z = nchw(inputs(64, batch=1)[0])
        first, times, out = timed(lambda: vae.decode(z).sample, a.repeats)
        np.save(os.path.join(out_dir, "torch_vae.npy"), out.numpy().transpose(0, 2, 3, 1))
        res["rows"].append(dict(what="VAE decode", shape="1x64x64x4 -> 512x512",
                                first_s=first, times=times))
        print(res["rows"][-1], flush=True)
    res["loadavg_after"] = os.getloadavg()
    with open(os.path.join(out_dir, "torch.json"), "w") as f:
        json.dump(res, f, indent=1)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--folder", default="/tmp/sd15_random")
    p.add_argument("--make", action="store_true", help="write the random unet/ and vae/ folders")
    p.add_argument("--time", action="store_true", help="time diffusers on them")
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="UNet latent sizes")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--load_only", choices=("unet", "vae"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.load_only:
        return load_only(a.folder, a.load_only)
    if not (a.make or a.time):
        p.error("nothing to do: give --make and/or --time")
    if a.make:
        make(a.folder)
    if a.time:
        time_all(a)


if __name__ == "__main__":
    main()
