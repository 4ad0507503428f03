"""qwen_base: the shared Qwen 2.5 implementation (model_kit/llm.py)."""

from model_kit.llm import TritonPythonModel  # noqa: F401
