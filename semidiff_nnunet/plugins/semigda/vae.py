"""The frozen Stable-Diffusion VAE of SemiGDA: loading it from a local path, strictly.

Accepted (nothing is ever downloaded):

* a diffusers folder (``config.json`` and ``diffusion_pytorch_model.safetensors`` or ``.bin``), e.g.
  ``stabilityai/sd-vae-ft-mse`` or the ``vae/`` folder of a Stable Diffusion repository;
* one ``.safetensors`` file, in diffusers or in LDM key names (e.g. ``vae-ft-mse-840000-ema-pruned``);
* an LDM ``.ckpt``/``.pt``/``.pth`` (``{"state_dict": ...}`` or a bare state dict), the authors'
  ``768-v-ema-first-stage-VAE.ckpt``; keys of a whole Stable Diffusion checkpoint
  (``first_stage_model.*``) are taken, and the VAE training loss's keys (``loss.*``: LPIPS and the
  discriminator, not part of the model) are dropped.

The architecture of a single file comes from a ``config.json`` (diffusers ``AutoencoderKL``
config) next to it when there is one, otherwise it is read off the weights' shapes (widths,
levels, res blocks per level, latent channels, in/out channels) with Stable Diffusion's
``norm_num_groups = 32`` and ``scaling_factor = 0.18215``.

LDM key names are converted to diffusers names by explicit rules (:func:`ldm_to_diffusers`); a key
no rule maps is an error, and the converted weights are loaded with ``strict=True``: a missing or
unexpected key is a :class:`~semidiff_nnunet.errors.SemidiffError` naming the keys (the authors load
with ``strict=False``, which hides a wrong mapping).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from semidiff_nnunet.errors import SemidiffError

INSTALL_HINT = 'install the extra with pip install -e ".[semigda]" (diffusers)'
SD_SCALING_FACTOR = 0.18215


def require_diffusers():
    """The ``diffusers`` module, or one sentence saying how to install it."""
    try:
        import diffusers
    except ImportError:
        raise SemidiffError(f"semigda needs diffusers, which is not installed; {INSTALL_HINT}.") from None
    return diffusers


# ---------------------------------------------------------------------------------------------- LDM keys
_RES = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_ATT = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _num_levels(keys, part: str, name: str) -> int:
    levels = {int(m.group(1)) for k in keys if (m := re.match(rf"{part}\.{name}\.(\d+)\.", k))}
    return max(levels) + 1 if levels else 0


def _convert_key(key: str, num_up: int) -> str | None:
    """The diffusers name of one LDM AutoencoderKL key, or None if no rule applies."""
    if re.fullmatch(r"(quant_conv|post_quant_conv)\.(weight|bias)", key):
        return key
    m = re.fullmatch(r"(encoder|decoder)\.(.+)", key)
    if not m:
        return None
    part, rest = m.groups()
    m = re.fullmatch(r"(conv_in|conv_out)\.(weight|bias)", rest)
    if m:
        return key
    m = re.fullmatch(r"norm_out\.(weight|bias)", rest)
    if m:
        return f"{part}.conv_norm_out.{m.group(1)}"
    m = re.fullmatch(r"mid\.block_([12])\.(\w+)\.(weight|bias)", rest)
    if m and m.group(2) in _RES:
        return f"{part}.mid_block.resnets.{int(m.group(1)) - 1}.{_RES[m.group(2)]}.{m.group(3)}"
    m = re.fullmatch(r"mid\.attn_1\.(\w+)\.(weight|bias)", rest)
    if m and m.group(1) in _ATT:
        return f"{part}.mid_block.attentions.0.{_ATT[m.group(1)]}.{m.group(2)}"
    if part == "encoder":
        m = re.fullmatch(r"down\.(\d+)\.block\.(\d+)\.(\w+)\.(weight|bias)", rest)
        if m and m.group(3) in _RES:
            return f"encoder.down_blocks.{m.group(1)}.resnets.{m.group(2)}.{_RES[m.group(3)]}.{m.group(4)}"
        m = re.fullmatch(r"down\.(\d+)\.downsample\.conv\.(weight|bias)", rest)
        if m:
            return f"encoder.down_blocks.{m.group(1)}.downsamplers.0.conv.{m.group(2)}"
    else:  # the LDM decoder numbers its levels from the highest resolution, diffusers from the lowest
        m = re.fullmatch(r"up\.(\d+)\.block\.(\d+)\.(\w+)\.(weight|bias)", rest)
        if m and m.group(3) in _RES:
            i = num_up - 1 - int(m.group(1))
            return f"decoder.up_blocks.{i}.resnets.{m.group(2)}.{_RES[m.group(3)]}.{m.group(4)}"
        m = re.fullmatch(r"up\.(\d+)\.upsample\.conv\.(weight|bias)", rest)
        if m:
            return f"decoder.up_blocks.{num_up - 1 - int(m.group(1))}.upsamplers.0.conv.{m.group(2)}"
    return None


def is_ldm_state_dict(state: dict) -> bool:
    return any(k.startswith(("encoder.down.", "decoder.up.", "encoder.mid.")) for k in state)


def ldm_to_diffusers(state: dict) -> dict:
    """LDM ``AutoencoderKL`` weights under diffusers' names. The mid-block attention's 1×1
    convolutions become diffusers' linear layers (weights (C, C, 1, 1) → (C, C)). A key that no rule
    maps is an error naming it."""
    num_up = _num_levels(state, "decoder", "up")
    out, unmapped = {}, []
    for key, value in state.items():
        new = _convert_key(key, num_up)
        if new is None:
            unmapped.append(key)
            continue
        if ".mid_block.attentions.0." in new and new.endswith(".weight") and value.dim() == 4:
            value = value[:, :, 0, 0]
        out[new] = value
    if unmapped:
        raise SemidiffError(f"The VAE weights hold {len(unmapped)} keys that are not those of an LDM AutoencoderKL "
                            f"({', '.join(unmapped[:5])}{', ...' if len(unmapped) > 5 else ''}); point vae= to the "
                            f"first-stage (VAE) weights of Stable Diffusion or a diffusers AutoencoderKL folder.")
    return out


def diffusers_to_ldm(state: dict) -> dict:
    """The inverse of :func:`ldm_to_diffusers` (tests write LDM checkpoints of a tiny VAE with it)."""
    num_up = _num_levels(state, "decoder", "up_blocks")
    inverse = {}
    # build the inverse by enumerating the LDM names this state would have
    res_inv = {v: k for k, v in _RES.items()}
    att_inv = {v: k for k, v in _ATT.items()}
    for key, value in state.items():
        k = key
        k = re.sub(r"conv_norm_out", "norm_out", k)
        m = re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(\w+)\.(weight|bias)", key)
        if m:
            k = f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{res_inv[m.group(3)]}.{m.group(4)}"
        m = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\."
                         r"(weight|bias)", key)
        if m:
            k = f"{m.group(1)}.mid.attn_1.{att_inv[m.group(2)]}.{m.group(3)}"
            if m.group(2) != "group_norm" and m.group(3) == "weight":
                value = value[:, :, None, None]
        m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)", key)
        if m:
            k = f"encoder.down.{m.group(1)}.block.{m.group(2)}.{res_inv[m.group(3)]}.{m.group(4)}"
        m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", key)
        if m:
            k = f"encoder.down.{m.group(1)}.downsample.conv.{m.group(2)}"
        m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)", key)
        if m:
            k = f"decoder.up.{num_up - 1 - int(m.group(1))}.block.{m.group(2)}.{res_inv[m.group(3)]}.{m.group(4)}"
        m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", key)
        if m:
            k = f"decoder.up.{num_up - 1 - int(m.group(1))}.upsample.conv.{m.group(2)}"
        inverse[k] = value
    return inverse


# ---------------------------------------------------------------------------------------------- config
def config_from_diffusers_state(state: dict) -> dict:
    """A diffusers ``AutoencoderKL`` config read off diffusers-named weights (SD's norm groups and scale)."""
    levels = _num_levels(state, "encoder", "down_blocks")
    if levels == 0 or "encoder.conv_in.weight" not in state:
        raise SemidiffError("The VAE weights are not those of an AutoencoderKL (no encoder levels); point vae= to "
                            "Stable Diffusion's VAE weights or a diffusers AutoencoderKL folder.")
    widths = [int(state[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0]) for i in range(levels)]
    per_level = len({m.group(1) for k in state if (m := re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", k))})
    return {
        "in_channels": int(state["encoder.conv_in.weight"].shape[1]),
        "out_channels": int(state["decoder.conv_out.weight"].shape[0]),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": widths,
        "layers_per_block": per_level,
        "latent_channels": int(state["decoder.conv_in.weight"].shape[1]),
        "norm_num_groups": 32,
        "scaling_factor": SD_SCALING_FACTOR,
        "use_quant_conv": "quant_conv.weight" in state,
        "use_post_quant_conv": "post_quant_conv.weight" in state,
    }


def _read_state(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise SemidiffError(f"The VAE weights {path} cannot be read ({type(e).__name__}); point vae= to a diffusers "
                            f"AutoencoderKL folder, a .safetensors file or an LDM .ckpt.") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise SemidiffError(f"The VAE file {path} holds no state dict; point vae= to a diffusers AutoencoderKL "
                            f"folder, a .safetensors file or an LDM .ckpt.")
    return obj


def _normalise_state(state: dict) -> dict:
    """Diffusers-named VAE weights from a diffusers or LDM state dict (a whole SD checkpoint's
    ``first_stage_model.*`` taken; ``loss.*`` of a VAE training checkpoint dropped)."""
    if any(k.startswith("first_stage_model.") for k in state):
        state = {k[len("first_stage_model."):]: v for k, v in state.items() if k.startswith("first_stage_model.")}
    state = {k: v for k, v in state.items() if not k.startswith("loss.")}
    return ldm_to_diffusers(state) if is_ldm_state_dict(state) else dict(state)


def _strict_load(vae, state: dict, source) -> None:
    expected = vae.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", wrong)):
            if keys:
                parts.append(f"{len(keys)} {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
        raise SemidiffError(f"The VAE weights in {source} do not fit the AutoencoderKL of its config: keys "
                            + "; ".join(parts) + ". Point vae= to matching weights (a diffusers AutoencoderKL "
                            "folder, or a single file with its config.json next to it).")
    vae.load_state_dict(state, strict=True)


def load_vae(path: str | Path):
    """A frozen (``requires_grad=False``, eval mode) diffusers ``AutoencoderKL`` from a local path (see
    the module docstring); every problem is one :class:`SemidiffError` sentence."""
    diffusers = require_diffusers()
    if not path:
        raise SemidiffError("semigda needs the Stable Diffusion VAE weights; give their local path with "
                            "--set vae=PATH (a diffusers AutoencoderKL folder, a .safetensors file or an LDM .ckpt).")
    path = Path(path).expanduser()
    if not path.exists():
        raise SemidiffError(f"The VAE weights path {path} does not exist; point --set vae=PATH to a diffusers "
                            f"AutoencoderKL folder, a .safetensors file or an LDM .ckpt.")
    config_file = None
    if path.is_dir():
        config_file = path / "config.json"
        files = [path / n for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")]
        weights = next((f for f in files if f.is_file()), None)
        if weights is None or not config_file.is_file():
            raise SemidiffError(f"The folder {path} is not a diffusers AutoencoderKL folder (it needs config.json and "
                                f"diffusion_pytorch_model.safetensors); point vae= to such a folder or to a weights file.")
    else:
        weights = path
        sibling = path.parent / "config.json"
        config_file = sibling if sibling.is_file() else None
    state = _normalise_state(_read_state(weights))
    if config_file is not None:
        config = json.loads(config_file.read_text())
        if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise SemidiffError(f"{config_file} describes a {config['_class_name']}, not an AutoencoderKL; semigda "
                                f"needs Stable Diffusion's KL VAE (posterior, quant_conv), so point vae= to one.")
    else:
        config = config_from_diffusers_state(state)
    try:
        vae = diffusers.AutoencoderKL.from_config({k: v for k, v in config.items()})
    except Exception as e:  # noqa: BLE001
        raise SemidiffError(f"The VAE config for {path} cannot build an AutoencoderKL ({e}); point vae= to a "
                            f"diffusers AutoencoderKL folder.") from None
    if not getattr(vae.config, "use_quant_conv", True) or vae.quant_conv is None:
        raise SemidiffError("This VAE has no quant_conv, which SemiGDA's CNN branch goes through; point vae= to "
                            "Stable Diffusion's KL VAE.")
    _strict_load(vae, state, weights)
    vae.requires_grad_(False)
    vae.eval()
    return vae
