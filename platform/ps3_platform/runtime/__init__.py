"""What runs inside every worker: distributed init, trainer loop, checkpoints, metrics."""
