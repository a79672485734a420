"""The extraction pipeline: model loading stack (`pipeline.models`), datasets, stages and the CLI."""
