"""The BCR task: prompt templates, the completion parser, answer verification and scoring."""
