"""Training options of the short continual runs the tests make on the tiny model."""

TINY_TRAINING = dict(
    per_device_train_batch_size=4,
    num_train_epochs=1,
    learning_rate=5e-3,
    report_to=[],
    use_cpu=True,
    save_strategy="no",
    logging_steps=1,
    disable_tqdm=True,
    seed=0,
    max_length=128,
)


def tiny_training(out, **options) -> dict:
    """``KPIGConfig`` keyword arguments: ``TINY_TRAINING`` into ``out``, ``options`` winning."""
    return {**TINY_TRAINING, "output_dir": str(out), **options}
