"""policyflow: reinforcement-learning post-training for language models that reason and use tools."""

__version__ = "0.1.0"
