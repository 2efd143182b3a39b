"""Lightning integration (``pip install 'hyperdiff[lightning]'``), imported explicitly as
``hyperdiff.app.lightning``: tune a ``LightningModule`` as it is.
"""
from hyperdiff.app.lightning.callback import HyperdiffCallback
from hyperdiff.app.lightning.optim import lightning_optimizers
from hyperdiff.app.lightning.task import lightning_task

__all__ = ["HyperdiffCallback", "lightning_optimizers", "lightning_task"]
