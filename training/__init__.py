"""Training: corpus synthesis, scenes, the recipe and trainer, scoring and evaluation.

This room imports `model` and `streaming` (and the agent's intent language, `agent.intents`);
neither of them, nor the agent's runtime, imports it. `training.cli` adds the `train`, `data`
and `eval` sub-commands to `salmonn-live`.
"""
