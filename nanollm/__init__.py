"""nanollm: GPT-2 pre-training in pure Python, after Karpathy's llm.c.

    import nanollm
    result = nanollm.train(nanollm.TrainConfig(model="d12", batch_size=64))

Submodules load on first use, so `python -m nanollm.train` and the kernels' tests import only
what they need.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {"train": "nanollm.train", "TrainConfig": "nanollm.train_config", "GPT2Config": "nanollm.config"}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'nanollm' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    # nanollm.train is the module itself, callable as the training function
    return module if name == "train" else getattr(module, name)
