"""Where the trained models keep their weights: ``NAME.pt`` (the state dict, loaded with torch alone) and
``NAME.json`` beside it ({"config": ..., "record": ...}: the model's shape and its training record)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidArgumentError

WEIGHTS = Path(__file__).parent / "weights"


def save(model: torch.nn.Module, record: dict[str, Any], name: str, folder: str | Path = WEIGHTS) -> Path:
    """Write ``name.pt`` (the state dict) and ``name.json`` (``model.config``, a dataclass, and ``record``) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / f"{name}.pt")
    meta = {"config": dataclasses.asdict(model.config), "record": record}
    (folder / f"{name}.json").write_text(json.dumps(meta, indent=1) + "\n")
    return folder / f"{name}.pt"


def metadata(name: str, folder: str | Path = WEIGHTS) -> dict[str, Any]:
    """The JSON written beside ``name``'s weights: {"config": ..., "record": ...}."""
    return json.loads((Path(folder) / f"{name}.json").read_text())


def state_dict(name: str, folder: str | Path = WEIGHTS) -> dict[str, torch.Tensor]:
    """``name``'s saved state dict, on the CPU."""
    return torch.load(Path(folder) / f"{name}.pt", map_location="cpu", weights_only=True)


def load_model(model_class, config_class, name: str, folder: str | Path, method, method_config: dict[str, Any],
               dtype: torch.dtype | None) -> torch.nn.Module:
    """``model_class(config, method, **method_config)`` with ``name``'s config and weights, in eval mode;
    only the method's own state (a learned method's, which the file does not hold) may be missing."""
    model = model_class(config_class(**metadata(name, folder)["config"]), method, **method_config)
    missing, unexpected = model.load_state_dict(state_dict(name, folder), strict=False)
    if unexpected or any(".method." not in key for key in missing):
        raise InvalidArgumentError("weights", f"the state dict of {name} (a learned method's state aside)",
                                   f"missing {missing}, unexpected {unexpected}")
    return model.to(dtype or torch.float32).eval()
