"""lm-eval tasks: the package's single-answer-token task configs and offline data."""
