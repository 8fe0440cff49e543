"""Distributed transfer learning on images: prepare, train, evaluate, export, predict."""

__version__ = "0.1.0"
