"""nanollm: GPT-2 pre-training in pure Python, after Karpathy's llm.c."""

__version__ = "0.1.0"
