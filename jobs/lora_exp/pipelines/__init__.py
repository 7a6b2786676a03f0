"""The commands that run something, one module each, none importing another: the eval job (``eval_job``),
distillation, a sweep's trials, export, generation, sanity's pre-flight checks and the memory plan's verdicts.
Each composes the engine on its own. (The train job is the engine's one training path: ``engine.fit``.)"""
