"""Make diffusers find hf_ddpm's classes by name, so that `DiffusionPipeline.from_pretrained` loads our pipelines
from the Hub or a folder with no `trust_remote_code` (facts in docs/design.md, "Loading from the Hub").

diffusers 0.42 resolves a `model_index.json` component ["hf_ddpm", "DDPMUNet"] as an attribute of
`diffusers.pipelines` (which also passes its Hub download check), and `_class_name` as an attribute of `diffusers`.
"""

from __future__ import annotations

import sys
from typing import Any

LIBRARY_NAME = "hf_ddpm"


def _qualified_name(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', getattr(obj, '__name__', ''))}"


def _attach(owner: Any, name: str, obj: Any) -> None:
    existing = owner.__dict__.get(name)
    if existing is None:
        try:
            existing = getattr(owner, name)
        except (AttributeError, ImportError, RuntimeError):  # diffusers' lazy modules raise on unknown names
            existing = None
    # Re-registering the same thing (also after a module reload) is a no-op; anything else is a clash.
    if existing is not None and existing is not obj and _qualified_name(existing) != _qualified_name(obj):
        raise ValueError(
            f"Cannot register {name!r} with {owner.__name__}: it already holds {_qualified_name(existing)}. "
            f"hf_ddpm registers only names that diffusers does not export."
        )
    setattr(owner, name, obj)


def register_with_diffusers(classes: dict[str, type]) -> None:
    """Attach the hf_ddpm package to `diffusers.pipelines` and `classes` to `diffusers`; idempotent.

    Raises:
        ValueError: if a name is already taken in diffusers by something that is not ours.
    """
    import diffusers
    import diffusers.pipelines

    _attach(diffusers.pipelines, LIBRARY_NAME, sys.modules[LIBRARY_NAME])
    for name, cls in classes.items():
        _attach(diffusers, name, cls)
