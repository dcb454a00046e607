"""Where a model comes from: a packaged name, a local Hugging Face directory, or a hub id."""

from tunesmith.models.resolve import ResolvedModel, resolve_model

__all__ = ["ResolvedModel", "resolve_model"]
