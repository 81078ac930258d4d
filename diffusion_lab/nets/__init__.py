"""Backbones: plain nn.Modules conditioned on the noise level, labels and extra scalars."""
