"""A timm model trained by a localopt rule inside PyTorch Lightning's ``Trainer``.

    pip install lightning timm
    python examples/lightning_timm.py             # a few CPU steps on random images

The model is wrapped once, before training; ``configure_optimizers`` returns a
:class:`localopt.optim.LocalOptimizer` (a ``torch.optim.SGD`` that also trains the feedback of
rules that learn it, here Kolen-Pollack), and Lightning's loop -- forward, ``backward``,
``optimizer.step(closure)``, ``zero_grad`` -- runs unchanged.  Replace the random data with
your ``DataLoader``s.
"""
from __future__ import annotations

import lightning as L
import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import localopt


class LocalRuleModule(L.LightningModule):
    """Any classifier, trained with a localopt rule."""

    def __init__(self, model: torch.nn.Module, rule: str = "kp", lr: float = 0.05,
                 **rule_options) -> None:
        super().__init__()
        self.model = localopt.wrap(model, rule, **rule_options)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return localopt.optim.LocalOptimizer(self.model, torch.optim.SGD, lr=self.lr,
                                             momentum=0.9)


def random_images(n: int = 64, num_classes: int = 10, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=g),
                         torch.randint(0, num_classes, (n,), generator=g))


def main(max_steps: int = 4, rule: str = "kp") -> LocalRuleModule:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10)
    module = LocalRuleModule(model, rule, exclude="fc", seed=0)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, DataLoader(random_images(), batch_size=16, shuffle=True))
    return module


if __name__ == "__main__":
    trained = main()
    print(localopt.summary(trained.model))
