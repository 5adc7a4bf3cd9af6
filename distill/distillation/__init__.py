"""What the student learns from: the losses (`loss=`), feature hints, the LightningModule, the optimizer."""
