"""LightningDataModules: batches ``(x in [-1, 1], labels)`` with shape properties known at init.

See docs/data_and_nets.md. Modules: ``toy`` (2-D Gaussian mixtures), ``digits`` (sklearn 8x8 digits),
``cifar10`` (torchvision CIFAR-10), ``image_folder`` (any folder of images), ``base`` (shared pieces).
"""

from diffusion_lab.data.base import DataModuleBase, TensorImageDataset, stratified_split
from diffusion_lab.data.cifar10 import CIFAR10
from diffusion_lab.data.digits import Digits
from diffusion_lab.data.image_folder import ImageFolder
from diffusion_lab.data.toy import GaussianMixture2D

__all__ = [
    "CIFAR10",
    "DataModuleBase",
    "Digits",
    "GaussianMixture2D",
    "ImageFolder",
    "TensorImageDataset",
    "stratified_split",
]
