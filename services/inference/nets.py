"""The ECG beat networks: one 1-D CNN family, wide for the teacher and narrow for the student.

A net reads a segment of filtered single-lead ECG at the fused windows' ECG rate, shape (batch, 1, samples), and
says whether a heartbeat's QRS complex sits at the segment's centre: logits over LABELS. The widths live in
NetConfig, so a student whose channels were pruned away is rebuilt from its config and state dict alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

LABELS = ("no_beat", "beat")


@dataclass(frozen=True)
class NetConfig:
    """Architecture of a BeatNet.

    widths: output channels of each conv block (conv, batch norm, ReLU, max-pool by 2).
    kernel: conv kernel size (odd; padding keeps the length).
    hidden: width of the dense layer before the logits (0: logits straight from the pooled features).
    window_samples: segment length the net was trained on (it pools globally, so it runs on any length).
    extra: free-form notes kept with the config (e.g. how much pruning removed).
    """

    widths: tuple[int, ...]
    kernel: int = 7
    hidden: int = 0
    in_channels: int = 1
    window_samples: int = 128
    classes: int = len(LABELS)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["widths"] = list(self.widths)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NetConfig:
        return cls(**{**data, "widths": tuple(int(w) for w in data["widths"])})


TEACHER = NetConfig(widths=(64, 128, 128, 256), kernel=7, hidden=128)
STUDENT = NetConfig(widths=(8, 16, 16, 32), kernel=7, hidden=16)


class BeatNet(nn.Module):
    """Conv blocks, global average pooling, an optional dense layer, logits."""

    def __init__(self, config: NetConfig) -> None:
        super().__init__()
        self.config = config
        blocks: list[nn.Module] = []
        channels = config.in_channels
        for width in config.widths:
            blocks += [
                nn.Conv1d(channels, width, config.kernel, padding=config.kernel // 2, bias=False),
                nn.BatchNorm1d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool1d(2),
            ]
            channels = width
        self.features = nn.Sequential(*blocks)
        head: list[nn.Module] = []
        if config.hidden:
            head += [nn.Linear(channels, config.hidden), nn.ReLU(inplace=True)]
            channels = config.hidden
        head.append(nn.Linear(channels, config.classes))
        self.head = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=2))


OUTPUTS = ("logits", "probabilities")


class ServedBeatNet(nn.Module):
    """What is served and exported: the net's logits and their softmax, in the order of OUTPUTS."""

    def __init__(self, net: BeatNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(x)
        return logits, torch.softmax(logits, dim=1)


def config_of(net: BeatNet) -> NetConfig:
    """The config that rebuilds `net` as it is now (after pruning changed its widths)."""
    widths = tuple(m.out_channels for m in net.features if isinstance(m, nn.Conv1d))
    linears = [m for m in net.head if isinstance(m, nn.Linear)]
    hidden = linears[0].out_features if len(linears) > 1 else 0
    return NetConfig(
        widths=widths,
        kernel=net.config.kernel,
        hidden=hidden,
        in_channels=net.config.in_channels,
        window_samples=net.config.window_samples,
        classes=net.config.classes,
        extra=dict(net.config.extra),
    )


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
