"""The recipes train exactly what they trained at main@d63a205, before issue 14's options existed.

Every option issue 14 adds (prior preservation, captions, buckets, loss and noise options, EMA,
optimizers, text-encoder adapters, the latent cache, the model card) is off by default, so a
recipe run must give the same adapter bit for bit. The oracle is the adapter those runs gave at
commit d63a205, recorded once: the one place a recorded hash is the right oracle, since the
requirement is "identical to what it produced then".

The digest covers the adapter's tensors (names, dtypes, shapes, bytes), not the file: the file's
metadata also holds the run's whole config.yaml and the package version, which grow with every new
(default-off) setting without changing what was trained.
"""

import hashlib

import pytest
import torch
from conftest import CONFIGS, run_cli
from safetensors.torch import load_file

# sha256 of the adapter tensors at main@d63a205 (see adapter_digest), one run each.
TINY_DIGESTS = {
    "waveft": "fa7905a26919103cfee54c62725fff69b0cc29da74a0029d2b44368dadb71872",
    "random-sparse": "2a91d4232c6e6e43dbd7fa6f91f1b2820d27b5d8c9b5e3288d99cad3d03dd466",
    "lora": "44f56662655734792977a36716fe65ec8339662eaeb23cb41b1ed07aef12228c",
}
MICRO_DIGEST = "4001aff297924259aecbe67550837258adfa1f4572a0cc6ab37255b582e5613e"


def adapter_digest(path) -> str:
    """sha256 over the file's tensors in name order: name, dtype, shape and raw bytes of each."""
    digest = hashlib.sha256()
    for name, tensor in sorted(load_file(str(path)).items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.contiguous().view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("method", list(TINY_DIGESTS))
def test_the_tiny_recipe_trains_the_adapter_it_trained_at_d63a205(tmp_path, method):
    run = tmp_path / method
    tiny_recipe = ["--config", CONFIGS / "tiny.yaml", "--resolution", "32", "--checkpoint-every", "0"]
    run_cli("train", *tiny_recipe, "--steps", "3", "--subject", "demo", "--method", method, "--output", run)
    assert adapter_digest(run / "adapter.safetensors") == TINY_DIGESTS[method]


def test_the_micro_recipe_trains_the_adapter_it_trained_at_d63a205(tmp_path):
    run = tmp_path / "micro"
    micro_recipe = ["--config", CONFIGS / "micro.yaml", "--checkpoint-every", "0"]
    run_cli("train", *micro_recipe, "--steps", "10", "--subject", "micro/teal_dog", "--output", run)
    assert adapter_digest(run / "adapter.safetensors") == MICRO_DIGEST
