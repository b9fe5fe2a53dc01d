"""Reward functions imported by path (`tests.rewards_for_tests:digit_fraction`) in pipeline tests."""


def dense(prompts, completions, **columns):
    """Digits count double, other characters once, per 10 characters: a dense reward, so even a
    random model's groups have reward variance (its completions differ in length and content)."""
    return [sum(2 if c.isdigit() else 1 for c in text) / 10 for text in completions]


def broken(prompts, completions, **columns):
    raise RuntimeError("this reward function always fails")
