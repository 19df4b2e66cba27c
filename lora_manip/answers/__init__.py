"""Answers: task kinds and the one classifier (kinds.py), the parser of model answers (parse.py, geometry.py) and
the coordinate rule for JSON ground truths (coordinates.py). Pure Python: data check, scoring and GRPO rewards
read answers the same way."""
