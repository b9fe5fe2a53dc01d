"""Episodes: environments (`env.py`), the episode runner (`episode.py`), action parsing and context policies."""
