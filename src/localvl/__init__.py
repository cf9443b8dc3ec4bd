"""localvl: Qwen vision-language models on your own machine, behind Anthropic's Messages API."""

__version__ = "0.1.0"
