"""A diffusers SDXL folder written as one original-layout (A1111/ComfyUI) `.safetensors` file.

diffusers reads such files (`from_single_file`) but has no writer for SDXL, so this module maps
each diffusers tensor name to the original name: the inverse of diffusers' own conversion in
`diffusers.loaders.single_file_utils`. Tests check the round trip against that conversion, so a
wrong name here fails there rather than passing silently.
"""

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer.text_model."
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_FIXED = {"conv_norm_out": "norm_out"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _split(name: str) -> tuple[str, str]:
    """'a.b.weight' -> ('a.b', 'weight')."""
    module, _, tensor = name.rpartition(".")
    return module, tensor


def unet_name(name: str, config: dict) -> str:
    stride = config["layers_per_block"] + 1  # resnets per down block, plus its downsampler
    up_has_attention = ["CrossAttn" in kind for kind in config["up_block_types"]]
    module, tensor = _split(name)
    if module in _UNET_FIXED:
        return f"{_UNET_FIXED[module]}.{tensor}"
    if match := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", module):
        block, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
        index = block * stride + layer + 1
        return _block_member(f"input_blocks.{index}", kind, rest, tensor)
    if match := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
        return f"input_blocks.{(int(match[1]) + 1) * stride}.0.op.{tensor}"
    if match := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", module):
        return f"middle_block.{2 * int(match[1])}.{_UNET_RESNET.get(match[2], match[2])}.{tensor}"
    if match := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", module):
        return f"middle_block.1.{match[1]}.{tensor}"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", module):
        block, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
        return _block_member(f"output_blocks.{block * stride + layer}", kind, rest, tensor)
    if match := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", module):
        block = int(match[1])
        slot = 2 if up_has_attention[block] else 1
        return f"output_blocks.{block * stride + stride - 1}.{slot}.conv.{tensor}"
    raise KeyError(f"no original name for UNet tensor {name}")


def _block_member(prefix: str, kind: str, rest: str, tensor: str) -> str:
    if kind == "attentions":
        return f"{prefix}.1.{rest}.{tensor}"
    return f"{prefix}.0.{_UNET_RESNET.get(rest, rest)}.{tensor}"


def vae_name(name: str, config: dict) -> str:
    up_blocks = len(config["up_block_types"])
    module, tensor = _split(name)
    coder, _, inner = module.partition(".")
    if inner in _VAE_FIXED:
        inner = _VAE_FIXED[inner]
    elif match := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", inner):
        inner = f"down.{match[1]}.block.{match[2]}.{_vae_resnet(match[3])}"
    elif match := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", inner):
        inner = f"down.{match[1]}.downsample.conv"
    elif match := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", inner):
        inner = f"up.{up_blocks - 1 - int(match[1])}.block.{match[2]}.{_vae_resnet(match[3])}"
    elif match := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", inner):
        inner = f"up.{up_blocks - 1 - int(match[1])}.upsample.conv"
    elif match := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", inner):
        inner = f"mid.block_{int(match[1]) + 1}.{_vae_resnet(match[2])}"
    elif match := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", inner):
        inner = f"mid.attn_1.{_VAE_ATTENTION[match[1]]}"
    if coder in ("quant_conv", "post_quant_conv"):
        return f"{coder}.{tensor}"
    return f"{coder}.{inner}.{tensor}"


def _vae_resnet(member: str) -> str:
    return "nin_shortcut" if member == "conv_shortcut" else member


def open_clip_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection's tensors in OpenCLIP's layout (q, k, v fused into in_proj)."""
    out = {
        "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
        "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
        "ln_final.weight": state["text_model.final_layer_norm.weight"],
        "ln_final.bias": state["text_model.final_layer_norm.bias"],
        "text_projection": state["text_projection.weight"].T.contiguous(),
    }
    layers = {int(m[1]) for name in state if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", name))}
    for layer in sorted(layers):
        source, target = f"text_model.encoder.layers.{layer}.", f"transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            out[f"{target}attn.in_proj_{kind}"] = torch.cat(
                [state[f"{source}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            ).contiguous()
            out[f"{target}attn.out_proj.{kind}"] = state[f"{source}self_attn.out_proj.{kind}"]
            for ours, theirs in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc")):
                out[f"{target}{theirs}.{kind}"] = state[f"{source}{ours}.{kind}"]
            out[f"{target}mlp.c_proj.{kind}"] = state[f"{source}mlp.fc2.{kind}"]
    return out


def _component(folder: Path, name: str) -> dict[str, torch.Tensor]:
    (weights,) = (folder / name).glob("*.safetensors")
    return load_file(str(weights))


def write_single_file(folder: Path, path: Path) -> dict[str, torch.Tensor]:
    """Every weight of the diffusers SDXL pipeline in `folder`, in one original-layout file at
    `path`; returns the tensors written."""
    tensors = {}
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    for name, tensor in _component(folder, "unet").items():
        tensors[UNET_PREFIX + unet_name(name, unet_config)] = tensor
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    for name, tensor in _component(folder, "vae").items():
        original = vae_name(name, vae_config)
        if ".mid.attn_1." in original and tensor.ndim == 2:  # the original VAE attends with 1x1 convs
            tensor = tensor[:, :, None, None]
        tensors[VAE_PREFIX + original] = tensor
    for name, tensor in _component(folder, "text_encoder").items():
        tensors[CLIP_L_PREFIX + name.removeprefix("text_model.")] = tensor
    for name, tensor in open_clip_tensors(_component(folder, "text_encoder_2")).items():
        tensors[OPEN_CLIP_PREFIX + name] = tensor
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(path))
    return tensors


def config_only_copy(folder: Path, target: Path) -> Path:
    """`folder` without its weights: model_index.json, every config.json, tokenizer and scheduler
    files. What `--model-config` needs beside a single file."""
    for source in folder.rglob("*"):
        if source.is_file() and source.suffix != ".safetensors":
            destination = target / source.relative_to(folder)
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_bytes(source.read_bytes())
    return target
