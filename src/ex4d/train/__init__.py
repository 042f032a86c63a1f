"""ex4d.train: training the EX-4D adapter from monocular videos (user guide: docs/training.md).

* :mod:`ex4d.train.masks` -- simulated visibility masks (render the DW-Mesh into a novel camera,
  z-test back to the source view, temporal majority filter).
* :mod:`ex4d.train.pairs` -- camera distribution, one pair per clip, resumable batch builder
  (``ex4d make-pairs``) with a manifest.
* :mod:`ex4d.train.dataset` -- reads a pair folder for training.
* :mod:`ex4d.train.objective` -- flow-matching objective consistent with the shift-5 sampler.
* :mod:`ex4d.train.trainer` -- deterministic, resumable accelerate loop over a ``TrainSystem``.
* :mod:`ex4d.train.wan_system` -- the EX-4D system: Wan2.1-I2V + LoRA + CamVidEncoder (``ex4d train``).

Heavy modules (diffusers, peft, moderngl) are imported inside the functions that need them.
"""
