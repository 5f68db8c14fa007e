"""The distillation teacher outside the model: the frozen teacher with its weights (model.py)
and the feature extraction tool (extract.py). Builds on data/ and models/; train/ builds on it."""
