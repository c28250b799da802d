"""A whitening projection for classification heads, computed by the coordinator from PUBLIC images.

Raw pooled EchoCare features are high-dimensional and dominated by a common mean, which makes
DP-SGD on a small hospital dataset drown in noise. The coordinator encodes public, synthetic
reference images (echofleet's phantom generator) with the same frozen encoder, and takes their
mean and top principal directions (whitened). That projection is a fixed buffer of every head: no
hospital data is involved, so it spends no privacy budget.

The projection is computed over the pooled columns the head reads: all five maps by default, the
last map's only for a ``pooling="last"`` head (``public_projection(..., stages=head.stages)``), so its
width always equals the head's ``in_dim``. It is computed in fp32 on the CPU, whatever device a site
extracts its own features on, so a site's recomputation matches the coordinator's.

Measured on this machine (echocare-tiny, 3 sites, epsilon 8, 2 rounds): BUSI validation AUROC
rose from ~0.56 (raw features) to ~0.65-0.70 with a 64-dim projection from 600 phantoms.
"""

from __future__ import annotations

# The computation lives on the hospital side (fed/features.py) so that a site can recompute the
# projection itself and verify the buffers of a head it is asked to evaluate (docs/privacy.md).
from fed.features import DEFAULT_REFERENCE, public_projection

__all__ = ["DEFAULT_REFERENCE", "public_projection"]
