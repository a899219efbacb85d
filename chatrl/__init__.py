"""chatrl: the InstructGPT recipe (SFT -> reward model -> PPO) in one command."""

import time as _time

IMPORTED = _time.time()  # before any heavy import: a time budget's origin (chatrl.cli.process_start)

__version__ = "0.1.0"

_API = ("DeepSpeedRLHFEngine", "DeepSpeedPPOTrainer", "DeepSpeedPPOTrainerUnsupervised")


def __getattr__(name):
    # The DeepSpeed-Chat names, imported lazily so `import chatrl` stays light.
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'chatrl' has no attribute {name!r}")
