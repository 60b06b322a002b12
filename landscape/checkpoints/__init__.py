"""Checkpoints as training frameworks write them, for post-hoc analysis.

* :mod:`~landscape.checkpoints.sources`: expand what the user names (files, Hugging Face
  model folders, ``Trainer`` output folders, Lightning ``.ckpt`` files) into loaded
  checkpoints and the model to load them into;
* :mod:`~landscape.checkpoints.huggingface`, :mod:`~landscape.checkpoints.lightning` and
  :mod:`~landscape.checkpoints.adapters` (PEFT adapter folders): the frameworks' layouts;
* :mod:`~landscape.checkpoints.tokens`: language-model batches from a token file or a text;
* :mod:`~landscape.checkpoints.optim`: the optimizer's hyper-parameters (and Adam's second
  moments) recorded next to the weights.
"""

from landscape.checkpoints.optim import optimizer_settings
from landscape.checkpoints.sources import Opened, open_checkpoints, open_data
from landscape.checkpoints.tokens import token_batches

__all__ = ["Opened", "open_checkpoints", "open_data", "optimizer_settings", "token_batches"]
