"""The distillation teacher outside the train step: cached feature files and their extraction."""
