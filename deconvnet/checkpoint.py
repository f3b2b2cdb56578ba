"""Checkpoints that carry everything an analysis needs: weights, model config, class names,
preprocessing (with the training set's mean image) and the measured accuracy."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .data import Preprocess
from .errors import UserError
from .models import ConvNet, ModelConfig
from .runner import atomic_torch_save

FORMAT = "deconvnet-checkpoint-v1"


@dataclass
class CheckpointInfo:
    """What :func:`load_checkpoint` returns beside the model."""

    config: ModelConfig
    classes: list[str]
    preprocess: Preprocess
    accuracy: dict = field(default_factory=dict)  # {"top1": .., "top5": .., "data": spec}
    epoch: int | None = None
    train_config: dict = field(default_factory=dict)

    @property
    def mean(self) -> torch.Tensor:
        """The per-pixel mean image of the training set, (C, S, S) in the model's scaled units."""
        return self.preprocess.mean


def save_checkpoint(path: str | Path, model: nn.Module, info: CheckpointInfo, extra: dict | None = None) -> None:
    """Write a checkpoint atomically; ``extra`` holds resumable training state (optimizer, RNG)."""
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    payload = {
        "format": FORMAT,
        "model_config": info.config.to_dict(),
        "state_dict": model.state_dict(),
        "classes": list(info.classes),
        "preprocess": info.preprocess.to_dict(),
        "mean": info.preprocess.mean,
        "accuracy": info.accuracy,
        "epoch": info.epoch,
        "train_config": info.train_config,
    }
    if extra:
        payload["training_state"] = extra
    atomic_torch_save(payload, path)


def read_checkpoint(path: str | Path) -> dict:
    """The raw checkpoint dict, or a one-line :class:`UserError` explaining why it is not one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling problem means "not a checkpoint"
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path} is not a deconvnet checkpoint (train one with `deconvnet train`)")
    return payload


def load_checkpoint(path: str | Path) -> tuple[ConvNet, CheckpointInfo]:
    """Load a checkpoint written by ``deconvnet train``: ``(model in eval mode, info)``."""
    payload = read_checkpoint(path)
    config = ModelConfig.from_dict(payload["model_config"])
    model = ConvNet(config)
    model.load_state_dict(payload["state_dict"])
    model.eval()
    pre = payload["preprocess"]
    std = torch.tensor(pre["std"]).reshape(-1, 1, 1) if pre.get("std") else None
    preprocess = Preprocess(pre["input_size"], pre["stored_size"], pre["channels"], payload["mean"],
                            pre["scale"], pre["pad"], std)
    info = CheckpointInfo(config, payload["classes"], preprocess, payload.get("accuracy") or {},
                          payload.get("epoch"), payload.get("train_config") or {})
    return model, info
