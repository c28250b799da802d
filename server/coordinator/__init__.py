"""The federation's coordinator: Flower ServerApp, strategies behind the SiteGuard, per-round
checkpoints, the run report, and the public reference features for the fixed head projection."""
