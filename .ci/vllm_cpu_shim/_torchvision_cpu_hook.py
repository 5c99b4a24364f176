"""Imports the torchvision shim (``_torchvision_cpu_shim``) only when something imports torchvision, so a
plain interpreter start does not import torch. Loaded by ``torchvision_cpu_shim.pth`` in every process,
including the engine and worker processes vLLM spawns."""

import sys


class _ShimOnTorchvisionImport:
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            import _torchvision_cpu_shim  # noqa: F401

        return None  # let the normal finders import torchvision itself


sys.meta_path.insert(0, _ShimOnTorchvisionImport())
