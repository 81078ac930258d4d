"""The standard FID InceptionV3 (torch-fidelity's network, as torchmetrics uses it), built offline.

FID, IS and KID are only comparable across papers when computed with the TensorFlow Inception graph of
Heusel et al. 2017 ("pt_inception-2015-12-05"), ported to PyTorch by torch-fidelity and pytorch-fid with the
same layer names. torch-fidelity's constructor downloads the weights from GitHub when no path is given and
otherwise opens the file with ``torch.load(weights_only=False)``. Here neither happens: the state dict is
read by :func:`diffusion_lab.pretrained.safe_load.load_state_dict_file` (safe, offline, clear error when the
file is missing) and handed to torch-fidelity's constructor in place of its download.

The network takes ``uint8`` images (B, 3, H, W) in [0, 255], resizes them to 299 x 299 with TensorFlow-1
compatible bilinear interpolation, and returns a tuple with one tensor per requested feature name
(``"64"``, ``"192"``, ``"768"``, ``"2048"``, ``"logits_unbiased"``, ``"logits"``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from unittest import mock

import torch_fidelity.feature_extractor_inceptionv3 as _tf_inception
from torch import Tensor
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from diffusion_lab.pretrained.safe_load import MissingWeightsError, load_state_dict_file

__all__ = ["INCEPTION_WEIGHTS_FILE", "INCEPTION_WHERE_TO_GET", "FIDInceptionV3", "load_fid_inception"]

INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_WHERE_TO_GET = (
    "download it on a machine with internet access from "
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth "
    "(pytorch-fid) or "
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth "
    "(torch-fidelity; same tensors), copy it here and set `feature_extractor_weights_path` to its path"
)

_KEEP_RANDOM_INIT: dict = {}  # sentinel handed to load_state_dict: keep the freshly initialised weights


class FIDInceptionV3(FeatureExtractorInceptionV3):
    """torch-fidelity's FID InceptionV3, constructed from an in-memory state dict and locked in eval mode.

    Args:
        state_dict: the network's tensors; ``None`` keeps torch-fidelity's random initialisation (tests,
            throughput benchmarks: the compute does not depend on the values).
        features_list: feature names returned by ``forward``, in this order.
    """

    def __init__(self, state_dict: Mapping[str, Tensor] | None, features_list: Sequence[str] = ("2048",)):
        tensors = _KEEP_RANDOM_INIT if state_dict is None else dict(state_dict)
        # torch-fidelity fetches its weights with this module-level function when no path is given; answer it
        # with the tensors we already hold, so no download (or unsafe unpickling) can happen.
        with mock.patch.object(_tf_inception, "load_state_dict_from_url", lambda *args, **kwargs: tensors):
            super().__init__("inception-v3-compat", list(features_list), feature_extractor_weights_path=None)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # noqa: D102
        if state_dict is _KEEP_RANDOM_INIT:
            return None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def train(self, mode: bool = True) -> FIDInceptionV3:
        """Always stay in eval mode: batch-norm statistics are part of the frozen metric."""
        return super().train(False)


def load_fid_inception(
    weights_path: str | os.PathLike | None, features_list: Sequence[str] = ("2048",)
) -> FIDInceptionV3:
    """Build the FID InceptionV3 from a local weights file (.pth or .safetensors); never downloads.

    Raises:
        MissingWeightsError: ``weights_path`` is None or does not exist; the message names the expected file
            (``pt_inception-2015-12-05-6726825d.pth``) and where a user gets it.
    """
    if weights_path is None:
        raise MissingWeightsError(
            f"FID InceptionV3: no weights file given. It needs '{INCEPTION_WEIGHTS_FILE}': "
            f"{INCEPTION_WHERE_TO_GET} (nothing is downloaded automatically)."
        )
    state_dict = load_state_dict_file(
        weights_path, what=f"FID InceptionV3 ({INCEPTION_WEIGHTS_FILE})", where_to_get=INCEPTION_WHERE_TO_GET
    )
    return FIDInceptionV3(state_dict, features_list)
