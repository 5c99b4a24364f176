"""``python -m mitigate.evals eval|score|report ...``: the evaluation commands on their own (also the entry
point for ``accelerate launch -m mitigate.evals``)."""

from .cli import standalone

standalone()()
