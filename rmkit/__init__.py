"""rmkit: customized reward models (BLT -> GRFT -> CRFT) on DeepSpeed.

Importing this package must stay cheap: no torch, transformers or deepspeed here, so that
`rmkit --help` is instant. Heavy imports live inside the functions that need them.
"""

__version__ = "0.1.0"
