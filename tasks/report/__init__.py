"""The run report (HTML) and the model card."""
