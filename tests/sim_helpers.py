"""Shared by the tests that start a simulated Flower federation (Ray)."""

#: Ray CPUs per virtual site in the tests. On the 2-core test machine this makes Ray run the sites
#: one after the other in one ClientApp actor instead of two actors side by side: each actor is a
#: fresh process that imports torch, MONAI and Flower, and on 2 cores (shared with the other pytest
#: worker) that start-up, not the sites' work, was most of a small federation (the 600-phantom run of
#: tests/echofleet/test_federation.py: 96 s instead of 129 s alone). A simulation's actors serve
#: several sites either way, so what the tests check does not change.
SITE_CPUS = 2.0
