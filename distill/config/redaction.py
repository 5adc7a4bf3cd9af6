"""The run's config as plain data with no secret in it: what goes to W&B, checkpoints and artifacts.

Two kinds of value are kept out:

- a key that names a secret (``api_key``, ``token``, ``secret``, ``password``, ``credential``,
  ``private_key``): its value becomes ``"<redacted>"``;
- a value read from the environment through ``${oc.env:...}``, directly or through other
  interpolations: the *interpolation text* is kept instead of its value (``${oc.env:DATA_DIR}``),
  so a reader with the same environment can still resolve it, and no one else learns it.

Hydra's own ``.hydra/config.yaml`` is written unresolved, so it holds the interpolation text too.
"""

from __future__ import annotations

import re
from typing import Any

from omegaconf import DictConfig, OmegaConf

REDACTED = "<redacted>"
SECRET_KEY = re.compile(r"api[_-]?key|token|secret|passw(or)?d|credential|private[_-]?key", re.IGNORECASE)
_REFERENCE = re.compile(r"\$\{([A-Za-z_][\w.]*)\}")


def _select(raw: Any, dotted: str) -> Any:
    node = raw
    for part in dotted.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def reads_environment(raw_root: dict[str, Any], text: str, seen: set[str] | None = None) -> bool:
    """Whether an (unresolved) config string's value comes from ``oc.env``, following references."""
    if "oc.env:" in text:
        return True
    seen = set() if seen is None else seen
    for ref in _REFERENCE.findall(text):
        if ref in seen:
            continue
        seen.add(ref)
        target = _select(raw_root, ref)
        if isinstance(target, str) and reads_environment(raw_root, target, seen):
            return True
    return False


def redacted_container(cfg: DictConfig) -> dict[str, Any]:
    """``OmegaConf.to_container(cfg, resolve=True)``, minus secrets (see the module docstring)."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    resolved = OmegaConf.to_container(cfg, resolve=True)

    def walk(raw_node: Any, value: Any, key: str | None) -> Any:
        if key is not None and SECRET_KEY.search(key) and value not in (None, ""):
            return REDACTED
        if isinstance(raw_node, str) and reads_environment(raw, raw_node):  # also a list/dict made from ${oc.env:...}
            return raw_node
        if isinstance(value, dict):
            return {k: walk(raw_node.get(k) if isinstance(raw_node, dict) else None, v, str(k)) for k, v in value.items()}
        if isinstance(value, list):
            raws = raw_node if isinstance(raw_node, list) else [None] * len(value)
            return [walk(r, v, key) for r, v in zip(raws, value, strict=False)]
        return value

    return walk(raw, resolved, None)
