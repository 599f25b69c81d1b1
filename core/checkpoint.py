"""Checkpoint files in: state_dicts in the formats users bring (ours, DDP, torch.compile,
open_clip_train, safetensors, a framework's prefix), never unpickling objects (torch.load with
weights_only=True), and checked against the sha256 our exports record."""
from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path

import torch

from core.data.shards import file_sha256
from core.errors import InputError
from core.model import build_model


class CheckpointError(InputError):
    """A checkpoint that cannot be loaded: names the file and what it holds."""


_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile, in either order
_EXPORT_HINT = "export a state_dict: torch.save(model.state_dict(), 'model.pt')"
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(name.endswith("/constants.pkl") or "/code/" in name for name in z.namelist())


def _unreadable(path: Path, err: Exception) -> str:
    """One line saying what a file that torch.load(weights_only=True) refused is."""
    pickled = _UNSUPPORTED_GLOBAL.search(str(err))
    if pickled:
        return (f"{path} holds a pickled {pickled.group(1)} object, not a state_dict; objects are never unpickled "
                f"from files (that runs code); {_EXPORT_HINT}")
    if path.stat().st_size == 0:
        return f"{path} is not a readable torch checkpoint: the file is empty"
    # torch's own advice (load with weights_only=False) would run the file's code: show only what failed
    lines = [line.strip() for line in str(err).splitlines() if line.strip() and "weights_only" not in line]
    cause = next((line for line in lines if line.startswith("WeightsUnpickler error")), lines[0] if lines else "")
    return (f"{path} is not a readable torch checkpoint (truncated, damaged or not a checkpoint): "
            f"{type(err).__name__} {cause[:200]}").rstrip()


def read_state_dict(path: Path) -> dict:
    """Parameter tensors of a checkpoint file: a plain state_dict (ours, torch.save'd, or
    `.safetensors`), an open_clip_train checkpoint (`state_dict`) or one of our training
    checkpoints (`model`); DDP's `module.` and torch.compile's `_orig_mod.` prefixes removed.
    Raises CheckpointError in one line naming the file and what it holds instead (TorchScript, a pickled
    model object, a damaged file)."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {'is not a file' if path.exists() else 'not found'}: {path}")
    if _is_torchscript(path):
        raise CheckpointError(f"{path} is a TorchScript archive (torch.jit.save), not a state_dict; load it with "
                              f"torch.jit.load and {_EXPORT_HINT}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # torch and safetensors raise many types for files they cannot read
        raise CheckpointError(_unreadable(path, err)) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # an open_clip_train checkpoint
        state = state["state_dict"]
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # one of our checkpoints
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        kind = type(state).__name__ if not isinstance(state, dict) else f"dict with keys {sorted(state)[:8]}"
        raise CheckpointError(f"{path} holds a {kind}, not a state_dict of tensors; {_EXPORT_HINT}")
    return {_unwrapped(k): v for k, v in state.items()}


def _fitted(state: dict, expected: set[str]) -> dict:
    """`state` without the prefix its keys share when the model's keys lack it (a training
    framework's attribute name, e.g. Lightning's `model.`); unchanged when no prefix fits."""
    head = os.path.commonprefix(list(state)).rpartition(".")[0]
    while head and not expected & set(state):
        stripped = {k[len(head) + 1:]: v for k, v in state.items()}
        if expected & set(stripped):
            return stripped
        head = head.rpartition(".")[0]
    return state


def _unwrapped(key: str) -> str:
    while key.startswith(_WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def exported_sha256(checkpoint: Path) -> str:
    """The sha256 of a checkpoint file: the one the export recorded in model_config.json beside it
    (which `load_model` checks the file against), else the file's own, hashed here."""
    config = checkpoint.parent / "model_config.json"
    meta = json.loads(config.read_text()) if config.is_file() else {}
    return meta.get("sha256", {}).get(checkpoint.name) or file_sha256(checkpoint)


def load_model(checkpoint: Path, model_name: str | None = None, objective: str = "mmcl"):
    """(model, preprocess, tokenizer) from a state_dict file; the model name comes from the
    model_config.json beside it (our exports) or from `model_name`. Raises CheckpointError naming the file
    when it is not the one model_config.json's sha256 recorded (damaged or replaced after export),
    holds NaN or inf (a diverged run), or does not fit the model."""
    config = checkpoint.parent / "model_config.json"
    meta = json.loads(config.read_text()) if config.is_file() else {}
    state = read_state_dict(checkpoint)
    expected = meta.get("sha256", {}).get(checkpoint.name)
    if expected and file_sha256(checkpoint) != expected:
        raise CheckpointError(f"{checkpoint} is not the file that was exported: its sha256 differs from the one in {config} "
                              f"(damaged or replaced); run the stage that wrote it again")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{checkpoint} holds NaN or inf in {len(bad)} of {len(state)} tensors (e.g. {bad[:3]}): "
                              f"the run that wrote it diverged")
    if model_name is None:
        if not meta:
            raise CheckpointError(f"{checkpoint}: no model_config.json beside it; give the open_clip model name")
        model_name, objective = meta["model"], meta.get("objective", objective)
    model, preprocess, tokenizer = build_model(model_name, objective)
    state = _fitted(state, set(model.state_dict()))
    missing, unexpected = [], []
    try:
        result = model.load_state_dict(state, strict=False)
        missing, unexpected = result.missing_keys, result.unexpected_keys
    except RuntimeError as err:  # shape mismatches
        raise CheckpointError(f"{checkpoint} does not match model {model_name!r}: {str(err)[:600]}") from None
    if missing or unexpected:
        raise CheckpointError(f"{checkpoint} does not match model {model_name!r}: missing keys {missing[:5]}, "
                              f"unexpected keys {unexpected[:5]}")
    return model, preprocess, tokenizer
