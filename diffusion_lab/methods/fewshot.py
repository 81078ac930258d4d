"""Few-shot learning with self-supervised pretraining (Chen et al., "Self-supervised learning for few-shot
image classification"): one import point for the YAML class paths.

* ``fewshot_ssl.py``: ``AMDIMPretraining``, ``SimCLRPretraining``, ``SupervisedPretraining`` (train the
  embedding on the training classes);
* ``fewshot_protonet.py``: ``ProtoNet`` (episodic fine-tuning) and ``EpisodicModule`` (nearest-prototype
  validation / test with 95% intervals, shared by all);
* ``fewshot_losses.py``: the math (AMDIM NCE, NT-Xent, ProtoNet logits, confidence interval).

See docs/fewshot.md.
"""

from diffusion_lab.methods.fewshot_protonet import (
    EpisodicModule,
    ProtoNet,
    embed_dataset,
    frozen_episode_accuracies,
    load_network_weights,
    save_network_weights,
)
from diffusion_lab.methods.fewshot_ssl import AMDIMPretraining, SimCLRPretraining, SupervisedPretraining

__all__ = [
    "AMDIMPretraining",
    "EpisodicModule",
    "ProtoNet",
    "SimCLRPretraining",
    "SupervisedPretraining",
    "embed_dataset",
    "frozen_episode_accuracies",
    "load_network_weights",
    "save_network_weights",
]
