"""The federated edge release: INT8 calibration (and acceptance) of a scanner build at the sites.

In a real federation neither the coordinator nor hospital IT's build machine holds patient
images, so what an edge build used to compute from central images is computed by the sites and
released under differential privacy, like every other release of a site:

- :mod:`edge.federated.plan`: what the coordinator sends (the FP32 ONNX model, its quantization
  points, and either a group and public reference per point: the scale release, the default; or
  fixed histogram bin edges per point) and the bounded per-image row every site computes;
- :mod:`edge.federated.site`: the hospital side: its own training split through the model,
  one bounded contribution per image, Gaussian noise from OS entropy, charged to its lifetime ledger;
- :mod:`edge.federated.coordinator`: the coordinator side: the plan (bin edges from public
  phantoms), the merge of the sites' noisy histograms, the ranges per point, the QDQ model.

The Flower apps that carry these messages are composed in the shell (``echofleet.apps``).
"""
