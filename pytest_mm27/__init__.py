"""pytest-mm27: LLM-serving performance as ordinary pytest results."""

__version__ = "0.1.0"
