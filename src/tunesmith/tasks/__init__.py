"""Tasks: what the model learns. Each registers itself by name."""

from tunesmith.tasks import text_classification  # noqa: F401  (registers it)
from tunesmith.tasks import image_classification  # noqa: F401,E402
from tunesmith.tasks import causal_lm  # noqa: F401,E402
