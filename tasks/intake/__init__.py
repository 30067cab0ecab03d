"""A user's own data: `init` writes a params file, `check` validates params and data without training."""
