"""Does the input pipeline keep up at 224 px on this CPU? (issue #32)

On 256-px JPEGs of CIFAR-100-real (``bench_memory.make_folder``), measured in one process, one after another:

1. decode + training augmentation (random-resized crop to 224, flip) in the DataLoader, per decoder (Pillow;
   torchvision's ``decode_image``, what the pipeline uses; TorchCodec's, when installed, which supersedes
   torchvision's from 0.29 on; all libjpeg-turbo) and per worker count;
2. the student's training step alone (forward, backward, SGD; batch 64, images already in memory) of MobileNetV2
   ×1.0 and ShuffleNetV2 ×1.0;
3. both together: the pipeline's loader (its decoder, persistent workers) feeding the MobileNetV2 step, as an epoch runs.

Images per second; the pipeline keeps up when (1) is well above (2). Run it alone: a second process's threads would
take the cores both sides share::

    python benchmarks/bench_input.py --out /tmp/mem
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_memory import make_folder  # noqa: E402
from edgedistill.data.loading import EpochSampler, ImageDataset, make_loader, to_float  # noqa: E402
from edgedistill.data.sources import load_data  # noqa: E402
from edgedistill.models.students import build_student  # noqa: E402
from edgedistill.recipe.schema import DataConfig  # noqa: E402

SIZE, BATCH = 224, 64


class PillowDecoded(ImageDataset):
    """The same dataset, its files decoded by Pillow."""

    def _read(self, i: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(self.split.paths[i]) as im:
            return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)


class TorchCodecDecoded(ImageDataset):
    """The same dataset, its files decoded by TorchCodec (which supersedes torchvision's decoders from 0.29 on)."""

    def _read(self, i: int) -> torch.Tensor:
        from torchcodec.decoders import decode_image

        return decode_image(str(self.split.paths[i]), mode="RGB")


DECODERS = {"Pillow": PillowDecoded, "torchvision (the pipeline's)": ImageDataset,
            **({"TorchCodec": TorchCodecDecoded} if importlib.util.find_spec("torchcodec") else {})}


def loader_rate(dataset: ImageDataset, images: int, workers: int) -> float:
    """Images per second through the DataLoader, over a second pass (the workers already up)."""
    sampler = EpochSampler(images, seed=0, shuffle=True)
    loader = make_loader(dataset, BATCH, sampler, num_workers=workers)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        t = time.perf_counter()
        for _ in loader:
            pass
    return images / (time.perf_counter() - t)


def step_rate(arch: str, steps: int, batches=None) -> float:
    """Training images per second of the student's step; ``batches``: an iterator of (images, labels) to feed it
    (the loader), else one batch held in memory."""
    torch.manual_seed(0)
    net = build_student(arch, 100, image_size=SIZE, mean=(0.5,) * 3, std=(0.25,) * 3).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    held = (torch.randint(0, 256, (BATCH, 3, SIZE, SIZE), dtype=torch.uint8), torch.randint(0, 100, (BATCH,)))
    source = batches if batches is not None else iter(lambda: held, None)
    for i, (images, labels, *_) in enumerate(source):
        if i == 2:  # two warm-up steps
            t = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(net(to_float(images, torch.device("cpu"))), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i == steps + 1:
            break
    return steps * BATCH / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--images", type=int, default=512, help="images per decoding pass")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per student")
    args = ap.parse_args()
    folder = make_folder(args.out, 1500)
    split = load_data(DataConfig(source="imagefolder", root=folder, image_size=SIZE)).test  # 256-px JPEGs, as training images
    same = {name: sum(np.array_equal(PillowDecoded(split, SIZE, train=False)._read(i), cls(split, SIZE, train=False)._read(i))
                      for i in range(64)) for name, cls in DECODERS.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; of 64 files, the same pixels as Pillow's: {same}\n")
    print("| what | img/s |\n| --- | ---: |")
    for name, cls in DECODERS.items():
        for workers in (0, 1, 2):
            rate = loader_rate(cls(split, SIZE, train=True, seed=0), args.images, workers)
            print(f"| decode ({name}) + train augment, {workers} workers | {rate:.0f} |", flush=True)
    for arch in ("mobilenet_v2", "shufflenet_v2_x1_0"):
        print(f"| {arch} step alone (batch {BATCH}) | {step_rate(arch, args.steps):.0f} |", flush=True)
    for workers in (0, 2):
        sampler = EpochSampler(len(split), seed=0, shuffle=True)
        loader = make_loader(ImageDataset(split, SIZE, train=True, seed=0), BATCH, sampler, num_workers=workers)
        print(f"| mobilenet_v2 step fed by the pipeline's loader ({workers} workers) | {step_rate('mobilenet_v2', args.steps, iter(loader)):.0f} |", flush=True)


if __name__ == "__main__":
    main()
