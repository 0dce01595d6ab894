"""The learner role's production engines (design card: docs/architecture.md, roles table).

`services.learner.deepspeed_engine.DeepSpeedLearner` runs the embedded learner's step
(npo.runtime.learner.TorchLearner) on a DeepSpeed engine with ZeRO. Import that module explicitly: this package
imports nothing heavy.
"""
