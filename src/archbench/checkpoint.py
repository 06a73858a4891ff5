"""Saving and loading weights and resumable training state — safetensors only, never pickle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from archbench.errors import ArchbenchError
from archbench.io import atomic_path


class CorruptFileError(ArchbenchError):
    """A weights or checkpoint file that cannot be read whole."""


def save_weights(model: nn.Module, path: Path) -> None:
    """Atomically write the model's weights (tied tensors stored once) as safetensors."""
    with atomic_path(path) as tmp:
        save_model(model, str(tmp))


def load_weights(model: nn.Module, path: Path) -> None:
    """Load safetensors weights into `model`, requiring an exact match of names and shapes."""
    try:
        load_model(model, str(path), strict=True, device="cpu")
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CorruptFileError(f"cannot load weights from {path}: {err}") from err


def save_training_state(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any]
) -> None:
    """Atomically write model, AdamW state, random state (CPU and the model's device) and `meta`
    (JSON) to one file."""
    tensors = {f"model.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    state = optimizer.state_dict()
    for index, slots in state["state"].items():
        for slot, value in slots.items():
            tensors[f"optim.{index}.{slot}"] = torch.as_tensor(value).clone().contiguous()
    tensors.update(_rng_states(_device_of(model)))
    header = {"meta": json.dumps(meta), "param_groups": json.dumps(state["param_groups"])}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)


def _unreadable(path: Path, err: Exception) -> CorruptFileError:
    """The error for a checkpoint file that cannot be read at all."""
    return CorruptFileError(
        f"cannot read checkpoint {path}: {err} (delete it to train the run from the start)"
    )


def read_training_meta(path: Path) -> dict[str, Any]:
    """The `meta` dict of a training-state file, without loading its tensors."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return json.loads(handle.metadata()["meta"])
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as err:
        raise _unreadable(path, err) from err


def load_training_state(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restore what `save_training_state` wrote; return its `meta` dict."""
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata()
    except (SafetensorError, OSError) as err:
        raise _unreadable(path, err) from err
    slots: dict[int, dict[str, torch.Tensor]] = {}
    try:
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, slot = key.split(".", 2)
                slots.setdefault(int(index), {})[slot] = value
        model.load_state_dict(
            {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")},
            strict=True,
        )
        optimizer.load_state_dict(
            {"state": slots, "param_groups": json.loads(header["param_groups"])}
        )
        _set_rng_states(tensors, _device_of(model))
        return json.loads(header["meta"])
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        raise CorruptFileError(
            f"checkpoint {path} does not fit this run's model or optimizer (was archbench's code "
            f"changed since it was written?); delete it to train from the start: {err}"
        ) from err


def _device_of(model: nn.Module) -> torch.device:
    """The device that the model's parameters live on."""
    return next(model.parameters()).device


def _rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    """The CPU generator's state, and that of `device` when it has its own (dropout on a GPU
    draws from the GPU's generator)."""
    states = {"rng.torch": torch.get_rng_state()}
    if device.type != "cpu":
        states[f"rng.{device.type}"] = torch.get_device_module(device).get_rng_state(device)
    return states


def _set_rng_states(tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    """Restore what `_rng_states` saved (a device's state only on a device of that type)."""
    torch.set_rng_state(tensors["rng.torch"])
    if device.type != "cpu" and f"rng.{device.type}" in tensors:
        torch.get_device_module(device).set_rng_state(tensors[f"rng.{device.type}"], device)
