"""One module per job; each exposes ``run(config, workdir)`` or ``train_and_evaluate(config, workdir)``."""
