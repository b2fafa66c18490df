"""Build the LPIPS weights file `sparse-db evaluate --lpips alex` reads (one safetensors).

    python scripts/convert_lpips.py                      # AlexNet, into the sparse-db cache
    python scripts/convert_lpips.py --net vgg --out lpips_vgg.safetensors
    python scripts/convert_lpips.py --backbone alexnet-owt-7be5be79.pth --heads lpips-0.1.4-py3-none-any.whl

LPIPS = torchvision's ImageNet AlexNet (or VGG16) feature layers + the five linear heads of LPIPS
v0.1. By default the backbone comes from torchvision's download URL and the heads from the
`lpips` wheel on PyPI (fetched with pip, not installed: `lpips` itself needs torchvision). Both
.pth files are read with torch.load(weights_only=True), which loads tensors and refuses code.
Needs network once; the result is used offline. This is the only place .pth files are read.
"""

import argparse
import io
import re
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

import torch

from sparse_dreambooth.errors import UserError
from sparse_dreambooth.metric_models import convert_lpips_weights, lpips_cache_file

TORCHVISION_BACKBONES = {
    "alex": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    "vgg": "https://download.pytorch.org/models/vgg16-397923af.pth",
}
LPIPS_WHEEL = "lpips==0.1.4"  # BSD-2-Clause; ships weights/v0.1/{alex,vgg,squeeze}.pth
HEADS_IN_WHEEL = "lpips/weights/v0.1/{net}.pth"


def read_state_dict(source: str, member: str | None = None) -> dict:
    """Tensors from a .pth or .safetensors file or an https:// URL; with `member`, from that file
    inside a wheel (zip). torch.load runs with weights_only=True."""
    if re.match(r"^https?://", source):
        with urllib.request.urlopen(source, timeout=300) as response:  # noqa: S310 (a URL the user chose)
            blob = response.read()
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise UserError(
                f"{source} does not exist; give a .pth or .safetensors file, the lpips wheel, or an https:// URL"
            )
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        blob = path.read_bytes()
    if member is not None and zipfile.is_zipfile(io.BytesIO(blob)):
        with zipfile.ZipFile(io.BytesIO(blob)) as archive:
            if member in archive.namelist():  # a wheel; torch.save files are zips too, without this member
                blob = archive.read(member)
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--net", choices=sorted(TORCHVISION_BACKBONES), default="alex", help="LPIPS backbone (default: alex)"
    )
    parser.add_argument(
        "--backbone", help="torchvision state dict: .pth file or URL (default: torchvision's download URL)"
    )
    parser.add_argument(
        "--heads", help="LPIPS v0.1 heads: {net}.pth, the lpips wheel, or a URL (default: the wheel, via pip)"
    )
    parser.add_argument("--out", type=Path, help="output .safetensors (default: the cache file `--lpips NET` reads)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        heads = args.heads
        if heads is None:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, LPIPS_WHEEL], check=True
            )
            heads = str(next(Path(tmp).glob("lpips-*.whl")))
        out = convert_lpips_weights(
            read_state_dict(args.backbone or TORCHVISION_BACKBONES[args.net]),
            read_state_dict(heads, HEADS_IN_WHEEL.format(net=args.net)),
            args.out or lpips_cache_file(args.net),
            net=args.net,
        )
    print(f"LPIPS {args.net} weights written to {out}; use `sparse-db evaluate --lpips {args.out or args.net}`")
    return out


if __name__ == "__main__":
    try:
        main()
    except UserError as error:
        sys.exit(f"convert_lpips: error: {error}")
