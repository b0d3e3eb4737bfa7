"""ernie-paddle: PaddlePaddle-native inference for Baidu's ERNIE 4.5 models.

`import ernie_paddle` stays light: paddle is imported only with ErniePredictor.
"""

__version__ = "0.1.0"
__all__ = ["ErniePredictor", "ErnieError", "__version__"]

from .errors import ErnieError


def __getattr__(name):
    if name == "ErniePredictor":
        from .predictor import ErniePredictor
        return ErniePredictor
    raise AttributeError(f"module 'ernie_paddle' has no attribute {name!r}")
