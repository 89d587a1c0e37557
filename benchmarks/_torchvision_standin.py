"""A stand-in `torchvision` for running real timm as a benchmark peer where torchvision cannot be
installed (its wheels pull CUDA). timm imports torchvision's transforms, datasets and ops at import
time but its ViT models never call them. `install()` registers an import hook that answers every
`torchvision.*` import with an empty module whose attributes are placeholder classes; calling one
raises, so a code path that really needs torchvision fails loudly. Benchmarks and tests only: never
shipped with vitkit.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types


class _MissingType(type):
    """Class-level attributes of a placeholder (`InterpolationMode.NEAREST`) are placeholders too."""

    def __getattr__(cls, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _MissingType(name, (_Missing,), {"__module__": cls.__module__})


class _Missing(metaclass=_MissingType):
    """Placeholder for a torchvision name; any use beyond import raises."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError(
            f"{type(self).__qualname__} is a torchvision stand-in: install torchvision to use it"
        )


class _StandinModule(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        placeholder = _MissingType(name, (_Missing,), {"__module__": self.__name__})
        setattr(self, name, placeholder)
        return placeholder


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StandinModule(spec.name)
        module.__path__ = []
        module.__version__ = "0.0+standin"
        return module

    def exec_module(self, module):
        pass


def install() -> None:
    """Make `import torchvision...` succeed with stand-ins, unless a real torchvision is importable."""
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return
    sys.meta_path.append(_Finder())
