"""Clear errors for pipeline folders with a missing component, before diffusers' generic ones."""

from __future__ import annotations

import json
import os
from pathlib import Path


def check_local_component(path: str | os.PathLike, subfolder: str | None, filename: str, class_name: str) -> None:
    """Raise a ValueError naming the missing file when a local folder lacks a component's `filename`.

    diffusers loads a component whose folder is missing from the pipeline root itself, so a root holding
    `model_index.json` is read to name the component that refers to `class_name`. Hub ids are left to the client.
    """
    root = Path(path)
    if not root.is_dir():
        return
    folder = root / subfolder if subfolder else root
    if (folder / filename).is_file():
        return
    index = root / "model_index.json"
    if not subfolder and index.is_file():
        entries = json.loads(index.read_text())
        names = [name for name, value in entries.items() if isinstance(value, list) and value[-1:] == [class_name]]
        if names:
            missing = ", ".join(f"{name}/{filename}" for name in names)
            raise ValueError(f"The pipeline folder {root} is missing {missing} (component {names[0]!r}).")
    raise ValueError(f"{folder} has no {filename}: it is not a saved {class_name}.")
