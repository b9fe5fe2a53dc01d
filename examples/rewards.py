"""An example user reward function for the jsonl task (TRL's signature).

Use it with `task.reward=examples.rewards:partial_credit` (run from the repository root).
"""


def partial_credit(prompts, completions, answer, **columns):
    """1 for the exact answer, 0.5 when the first digit is right, else 0."""
    rewards = []
    for completion, reference in zip(completions, answer):
        text = completion.strip()
        if text == reference:
            rewards.append(1.0)
        elif text[:1] == reference[:1]:
            rewards.append(0.5)
        else:
            rewards.append(0.0)
    return rewards
