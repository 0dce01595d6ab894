"""The embedded roles and the step loop: engines, learner, store, checkpoints, models, tasks, runner."""
