"""Convert a weights file (guided-diffusion .pt, DINO .pth, open_clip .bin, diffusers .bin, or one of this
project's Lightning .ckpt files) into safetensors.

The input is read by the project's safe loader (``torch.load(weights_only=True)`` after a scan for code, or
safetensors), so converting never runs code from the file. Examples::

    # a public guided-diffusion checkpoint, checked against the preset's parameter names and shapes
    python tools/convert_checkpoint.py 256x256_diffusion_uncond.pt adm_uncond.safetensors \\
        --check adm/256x256_diffusion_uncond
    # the EMA backbone of a Lightning checkpoint of this project
    python tools/convert_checkpoint.py last.ckpt ema_unet.safetensors --prefix ema.averaged.network.
    # a diffusers folder that only has pickle weights
    python tools/convert_checkpoint.py unet/diffusion_pytorch_model.bin unet/diffusion_pytorch_model.safetensors
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from diffusion_lab.pretrained.safe_load import load_state_dict_file

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def select_prefix(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Keep the tensors whose names start with ``prefix`` and drop the prefix (e.g. ``ema.averaged.``)."""
    selected = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not selected:
        prefixes = sorted({k.split(".")[0] + "." for k in state})
        raise ValueError(f"no tensor name starts with {prefix!r}; top-level prefixes: {prefixes}")
    return selected


def check_against_preset(state: dict[str, Tensor], name: str) -> None:
    """Compare names and shapes with an ADM preset (``adm/<preset>``), built on the meta device."""
    from diffusion_lab.nets.adm import from_preset

    if not name.startswith("adm/"):
        raise ValueError(f"--check supports adm/<preset> names, got {name!r}")
    expected = {
        k: tuple(v.shape)
        for k, v in from_preset(name.removeprefix("adm/"), device="meta").state_dict().items()
    }
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
    if missing or unexpected or wrong:
        raise ValueError(
            f"not a {name} checkpoint: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shapes {[(k, got[k], expected[k]) for k in wrong[:5]]}"
        )


def _untie(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """safetensors stores each tensor once: give tensors that share memory (tied weights) their own copy,
    and make every tensor contiguous."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, tensor in state.items():
        tensor = tensor.detach().contiguous()
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        out[name] = tensor.clone() if key in seen or tensor.numel() == 0 else tensor
        seen.add(key)
    return out


def convert(
    source: str | Path,
    target: str | Path,
    *,
    key: str | None = None,
    prefix: str | None = None,
    dtype: str | None = None,
    check: str | None = None,
) -> dict[str, Tensor]:
    """Read ``source`` safely, optionally select / cast / check, and write ``target`` as safetensors."""
    source, target = Path(source), Path(target)
    if target.suffix != ".safetensors":
        raise ValueError(f"the output should end in .safetensors, got '{target}'")
    state = load_state_dict_file(
        source, what="checkpoint to convert", where_to_get="the path you passed", key=key
    )
    if prefix:
        state = select_prefix(state, prefix)
    if dtype:
        state = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in state.items()}
    if check:
        check_against_preset(state, check)
    state = _untie(state)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(target), metadata={"format": "pt", "converted_from": source.name})
    return state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="input weights file (.pt, .pth, .bin, .ckpt, .safetensors)")
    parser.add_argument("target", help="output .safetensors file")
    parser.add_argument("--key", help="nested key holding the state dict (default: auto, e.g. state_dict)")
    parser.add_argument("--prefix", help="keep only tensors under this name prefix and strip it")
    parser.add_argument("--ema", action="store_true", help="shorthand for --prefix ema.averaged.")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating-point tensors")
    parser.add_argument(
        "--check", help="verify names and shapes against a registry entry, e.g. adm/64x64_diffusion"
    )
    args = parser.parse_args(argv)
    prefix = "ema.averaged." if args.ema and not args.prefix else args.prefix
    state = convert(args.source, args.target, key=args.key, prefix=prefix, dtype=args.dtype, check=args.check)
    numel = sum(t.numel() for t in state.values())
    print(f"wrote {len(state)} tensors ({numel / 1e6:.2f}M values) to {args.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
