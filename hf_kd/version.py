"""The version of hf_kd, in a module of its own: `hf_kd.hub` writes it on model cards without importing the package
`hf_kd` (whose `__init__` imports `hf_kd.hub`: that would be an import cycle), and setup.cfg reads it statically."""

__version__ = "0.1.0.dev0"
