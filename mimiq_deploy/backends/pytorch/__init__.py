"""PyTorch back end: the student as a module of integer kernels (kernels.py), eager, compiled and exported."""
from .backend import ModuleRunner, PyTorchBackend, PyTorchConfig

__all__ = ["ModuleRunner", "PyTorchBackend", "PyTorchConfig"]
