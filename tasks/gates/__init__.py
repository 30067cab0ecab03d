"""Gates: paired statistics, the promotion policy, each gate's verdict, the run's verdict."""
