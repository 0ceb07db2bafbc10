"""The training loop of the learnability tests: Adam on mini-batches drawn from fixed generators.

Every learnability test (properties/test_learnability.py and the families' own, such as the Decision
Transformer's and the vision transformer's) trains through ``train``, so a model is judged on what it
learns, never on a training loop of its own.
"""

from __future__ import annotations

import torch

from properties.plugin import CheckedModule, backward

SEED = 20240501


def data_generator(salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(SEED + salt)


def train(model: CheckedModule, loss_of_batch, *, steps: int, lr: float, batch: int, n_train: int) -> list[float]:
    """Adam for ``steps`` steps on mini-batches of indices drawn from a fixed generator; returns the losses.
    ``loss_of_batch(index)`` computes the loss of the training examples ``index`` in train mode."""
    torch.manual_seed(SEED)  # dropout, if any
    order = data_generator(99)
    optimizer = torch.optim.Adam(model.module.parameters(), lr=lr)
    model.module.train()
    losses = []
    for _ in range(steps):
        index = torch.randint(0, n_train, (batch,), generator=order)
        loss = loss_of_batch(index)
        optimizer.zero_grad()
        backward(loss, model)
        optimizer.step()
        losses.append(loss.item())
    model.module.eval()
    return losses
