"""A callback given to the other framework's Trainer: one error naming the right one.

The names are easy to confuse (Lightning has a ``Trainer`` too); a review got
``AttributeError: ... has no attribute 'on_exception'`` and ``... 'on_init_end'``.
"""

from __future__ import annotations

import re

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from landscape.integrations.huggingface import LandscapeTrainerCallback
from landscape.integrations.lightning import LandscapeCallback


class _Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_the_hugging_face_callback_in_a_lightning_trainer_names_lightnings(tmp_path):
    data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,)))
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir=tmp_path,
                        callbacks=[LandscapeTrainerCallback(path=str(tmp_path / "run.h5"))])
    with pytest.raises(TypeError, match=re.escape(
            "for a Lightning Trainer use landscape.integrations.lightning.LandscapeCallback")):
        trainer.fit(_Module(), torch.utils.data.DataLoader(data, batch_size=8))
    assert not (tmp_path / "run.h5").exists()


def test_the_lightning_callback_in_a_hugging_face_trainer_names_the_trainers(tmp_path):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(str(tmp_path / "out"), report_to="none", use_cpu=True)
    with pytest.raises(TypeError, match=re.escape(
            "for a Hugging Face Trainer use "
            "landscape.integrations.huggingface.LandscapeTrainerCallback")):
        Trainer(model=nn.Linear(4, 2), args=args,
                callbacks=[LandscapeCallback(path=str(tmp_path / "run.h5"))])
