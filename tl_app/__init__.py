"""tl-app: transfer learning on image folders with Keras 3 and TensorFlow."""

__version__ = "0.1.0"
