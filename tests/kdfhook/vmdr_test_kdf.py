"""Make ``vmdr.repository.keys.default_kdf()`` cheap in test processes, without importing
vmdr at start-up: the module is patched right after it is first imported."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

KEYS = "vmdr.repository.keys"


def cheapen(keys: Any) -> None:  # vmdr.repository.keys
    keys.DEFAULT_KDF = keys.KdfParams.for_tests()


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if name != KEYS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        loader: Any = spec.loader
        run = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            cheapen(module)

        loader.exec_module = exec_module
        return spec


def install() -> None:
    if KEYS in sys.modules:
        cheapen(sys.modules[KEYS])
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
