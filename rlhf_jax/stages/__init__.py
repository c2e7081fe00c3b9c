"""Pipeline stages: one small module per stage, each a function of a config
that calls the runner; the demo task is one preset among others."""
