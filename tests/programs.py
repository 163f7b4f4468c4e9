"""Healthy programs whose loss is not "lower is better from a positive start", in the style of public examples.

- :class:`GaussianNLL`: heteroscedastic regression (mean and variance heads, ``F.gaussian_nll_loss``, as in
  PyTorch's docs and deep-ensemble examples): the loss goes negative as the variance shrinks.
- :class:`Reinforce`: REINFORCE with a running-mean baseline (PyTorch's ``examples/reinforcement_learning``)
  on a contextual bandit over the digits: the loss is a signed, noisy surrogate, not a progress measure.
- :class:`FrozenTable`: a frozen embedding table of GloVe's size under a small trainable head: a large
  state next to a fast step, with NaN batches at chosen steps (rollback's bounded loss of progress).
- :class:`MoonsGAN`: a GAN on ``make_moons`` (the PyTorch DCGAN example's loop: D step, then G step, BCE),
  manual optimization with two optimizers; the returned loss is the generator's.

Each ``metric()`` is the run's result (higher is better for all three, so tables read alike).
"""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits, make_moons
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def _digits(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return torch.tensor(x, dtype=torch.float32)[perm] / 16, torch.tensor(y)[perm]


def loader(*tensors: torch.Tensor, batch_size: int = 64, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=True, generator=g)


class GaussianNLL(pl.LightningModule):
    """Predicts the digit's label as a number, with a variance: the NLL ends well below zero."""

    def __init__(self, lr: float = 3e-3, seed: int = 0) -> None:
        super().__init__()
        x, y = _digits(seed)
        self.train_xy = (x[:1400], y[:1400].float() / 9)
        self.val_xy = (x[1400:], y[1400:].float() / 9)
        self.seed, self.lr = seed, lr
        self.body = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.mean, self.log_var = nn.Linear(64, 1), nn.Linear(64, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.mean(h).squeeze(-1), self.log_var(h).squeeze(-1).clamp(-10, 5).exp()

    def training_step(self, batch, batch_idx):
        x, y = batch
        mu, var = self(x)
        return F.gaussian_nll_loss(mu, y, var)

    def train_dataloader(self):
        return loader(*self.train_xy, seed=self.seed)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    @torch.no_grad()
    def metric(self) -> float:
        """Minus the validation NLL (higher is better)."""
        mu, var = self(self.val_xy[0])
        return -float(F.gaussian_nll_loss(mu, self.val_xy[1], var))


class Reinforce(pl.LightningModule):
    """A policy picks a class for each digit; reward 1 when right. Loss ``-(log p(a) * (r - b)).mean()``."""

    def __init__(self, lr: float = 1e-2, seed: int = 0) -> None:
        super().__init__()
        x, y = _digits(seed)
        self.train_xy, self.val_xy = (x[:1400], y[:1400]), (x[1400:], y[1400:])
        self.seed, self.lr = seed, lr
        self.policy = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
        self.baseline = 0.0

    def training_step(self, batch, batch_idx):
        x, y = batch
        dist = torch.distributions.Categorical(logits=self.policy(x))
        action = dist.sample()
        reward = (action == y).float()
        advantage = reward - self.baseline
        self.baseline = 0.95 * self.baseline + 0.05 * float(reward.mean())
        return -(dist.log_prob(action) * advantage).mean()

    def train_dataloader(self):
        return loader(*self.train_xy, batch_size=32, seed=self.seed)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    @torch.no_grad()
    def metric(self) -> float:
        """Greedy reward on held-out digits."""
        return float((self.policy(self.val_xy[0]).argmax(-1) == self.val_xy[1]).float().mean())


class MoonsGAN(pl.LightningModule):
    """A 2-D GAN: discriminator step, then generator step (non-saturating BCE); manual optimization."""

    def __init__(self, lr: float = 1e-3, seed: int = 0) -> None:
        super().__init__()
        self.automatic_optimization = False
        x, _ = make_moons(2048, noise=0.05, random_state=seed)
        self.data = torch.tensor(x, dtype=torch.float32)
        self.seed, self.lr = seed, lr
        self.G = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
        self.D = nn.Sequential(nn.Linear(2, 64), nn.LeakyReLU(0.2), nn.Linear(64, 1))

    def training_step(self, batch, batch_idx):
        (real,) = batch
        opt_d, opt_g = self.optimizers()
        fake = self.G(torch.randn(len(real), 8))
        ones, zeros = torch.ones(len(real), 1), torch.zeros(len(real), 1)
        d_loss = F.binary_cross_entropy_with_logits(self.D(real), ones) + F.binary_cross_entropy_with_logits(
            self.D(fake.detach()), zeros
        )
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        g_loss = F.binary_cross_entropy_with_logits(self.D(fake), ones)
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        return g_loss.detach()

    def train_dataloader(self):
        return loader(self.data, batch_size=128, seed=self.seed)

    def configure_optimizers(self):
        betas = (0.5, 0.999)
        return [
            torch.optim.Adam(self.D.parameters(), lr=self.lr, betas=betas),
            torch.optim.Adam(self.G.parameters(), lr=self.lr, betas=betas),
        ]

    @torch.no_grad()
    def metric(self) -> float:
        """Minus the RBF-kernel MMD² between 512 generated points and 512 data points (0 is perfect)."""
        g = torch.Generator().manual_seed(1234)
        fake = self.G(torch.randn(512, 8, generator=g))
        real = self.data[torch.randperm(len(self.data), generator=g)[:512]]

        def k(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.exp(-torch.cdist(a, b).square() / 0.1).mean()

        return -float(k(fake, fake) + k(real, real) - 2 * k(fake, real))


class FrozenTable(pl.LightningModule):
    """Digits as tokens (position * 17 + pixel value) through a frozen embedding table of GloVe's size
    (400k x 40, 64 MB), and a small trainable head: its state is large next to its step time, so the 1%
    time budget alone allowed one snapshot in ~1000 steps. NaN batches at the steps in ``burst``."""

    def __init__(self, burst: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.burst = burst
        self.table = nn.Embedding(400_000, 40)
        self.table.weight.requires_grad_(False)
        self.head = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 10))
        self.register_buffer("offsets", torch.arange(64) * 17)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.offsets + (x * 16).round().long()
        return self.head(self.table(tokens).sum(1) / 8)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        if self.global_step in self.burst:
            logits = logits * math.nan
        return F.cross_entropy(logits, y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.head.parameters(), lr=0.05, momentum=0.9)


PROGRAMS = {"gaussian_nll": GaussianNLL, "reinforce": Reinforce, "gan": MoonsGAN}
