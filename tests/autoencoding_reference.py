"""Test-only PyTorch reference of the seed's autoencoder losses, written from its formulas
(sgm/modules/autoencoding/losses/discriminator_loss.py, lpips/loss/lpips.py, lpips/model/model.py,
lpips/vqperceptual.py), plus weight copies Flax -> PyTorch. Imported by the tests only."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F

# torchvision vgg16().features; "M" = 2x2 max pool. LPIPS taps the relu after convs 2, 4, 7, 10, 13.
VGG_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
TAP_AFTER = (3, 8, 15, 22, 29)


class TorchLPIPS(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layers, channels = [], 3
        for item in VGG_LAYOUT:
            if item == "M":
                layers.append(torch.nn.MaxPool2d(2, 2))
            else:
                layers += [torch.nn.Conv2d(channels, item, 3, padding=1), torch.nn.ReLU()]
                channels = item
        self.features = torch.nn.Sequential(*layers)
        self.lins = torch.nn.ModuleList(torch.nn.Conv2d(c, 1, 1, bias=False) for c in (64, 128, 256, 512, 512))
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in TAP_AFTER:
                out.append(x)
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ta, tb = self.taps((a - self.shift) / self.scale), self.taps((b - self.shift) / self.scale)
        total = 0.0
        for lin, fa, fb in zip(self.lins, ta, tb):
            na = fa / (torch.sqrt(torch.sum(fa**2, dim=1, keepdim=True)) + 1e-10)
            nb = fb / (torch.sqrt(torch.sum(fb**2, dim=1, keepdim=True)) + 1e-10)
            total = total + lin((na - nb) ** 2).mean([2, 3], keepdim=True)
        return total  # [B, 1, 1, 1]

    def load_from(self, vgg: Mapping[str, np.ndarray], heads: Mapping[str, np.ndarray]) -> "TorchLPIPS":
        with torch.no_grad():
            for name, p in self.features.named_parameters():
                p.copy_(torch.from_numpy(np.asarray(vgg[f"features.{name}"])))
            for k, lin in enumerate(self.lins):
                lin.weight.copy_(torch.from_numpy(np.asarray(heads[f"lin{k}.model.1.weight"])))
        return self


class TorchNLayerDiscriminator(torch.nn.Module):
    def __init__(self, input_nc: int, ndf: int, n_layers: int) -> None:
        super().__init__()
        layers: list[Any] = [torch.nn.Conv2d(input_nc, ndf, 4, 2, 1), torch.nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            layers += [torch.nn.Conv2d(ndf * prev, ndf * mult, 4, 2 if n < n_layers else 1, 1, bias=False),
                       torch.nn.BatchNorm2d(ndf * mult), torch.nn.LeakyReLU(0.2)]
        layers.append(torch.nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = torch.nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def disc_state_dict(params: Mapping[str, Any], batch_stats: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Flax NLayerDiscriminator variables -> the torch module's state dict."""
    out = {}
    for name, leaves in params.items():
        index = name.split("_")[1]
        for leaf, value in leaves.items():
            a = np.asarray(value)
            if leaf == "kernel":
                out[f"main.{index}.weight"] = torch.from_numpy(np.ascontiguousarray(a.transpose(3, 2, 0, 1)))
            else:
                out[f"main.{index}.{'weight' if leaf == 'scale' else 'bias'}"] = torch.from_numpy(a.copy())
    for name, stats in batch_stats.items():
        index = name.split("_")[1]
        out[f"main.{index}.running_mean"] = torch.from_numpy(np.asarray(stats["mean"]).copy())
        out[f"main.{index}.running_var"] = torch.from_numpy(np.asarray(stats["var"]).copy())
        out[f"main.{index}.num_batches_tracked"] = torch.tensor(0)
    return out


def d_loss(kind: str, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    if kind == "hinge":
        return 0.5 * (torch.mean(F.relu(1.0 - real)) + torch.mean(F.relu(1.0 + fake)))
    return 0.5 * (torch.mean(F.softplus(-real)) + torch.mean(F.softplus(fake)))


def general_loss(cfg: Mapping[str, Any], disc: torch.nn.Module, lpips: torch.nn.Module | None, x: torch.Tensor,
                 xrec: torch.Tensor, logvar: torch.Tensor, reg_log: Mapping[str, torch.Tensor], *,
                 optimizer_idx: int, global_step: int, last_layer: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """GeneralLPIPSWithDiscriminator.forward in training mode (weights=None)."""
    rec = torch.abs(x - xrec)
    if cfg["perceptual_weight"] > 0:
        rec = rec + cfg["perceptual_weight"] * lpips(x, xrec)
    nll = rec / torch.exp(logvar) + logvar
    nll = torch.sum(nll) / nll.shape[0]
    active = global_step >= cfg["disc_start"]
    if optimizer_idx == 0:
        if active:
            g = -torch.mean(disc(xrec))
            nll_grads = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
            g_grads = torch.autograd.grad(g, last_layer, retain_graph=True)[0]
            d_weight = torch.clamp(torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4), 0.0, 1e4).detach()
            d_weight = d_weight * cfg["disc_weight"]
        else:
            g, d_weight = torch.tensor(0.0), torch.tensor(0.0)
        loss = nll + d_weight * cfg["disc_factor"] * g
        for k, w in cfg["regularization_weights"].items():
            loss = loss + w * reg_log[k]
        return loss, {"loss/nll": nll, "loss/rec": rec.mean(), "loss/g": g, "scalars/d_weight": d_weight}
    real, fake = disc(x.detach()), disc(xrec.detach())
    loss = cfg["disc_factor"] * d_loss(cfg["disc_loss"], real, fake) if active else torch.tensor(0.0)
    return loss, {"logits/real": real.mean(), "logits/fake": fake.mean()}
