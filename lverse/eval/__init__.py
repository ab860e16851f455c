"""Evaluation: the papers' protocols on the field's own libraries (``lverse evaluate``).

:mod:`~lverse.eval.captions` (pycocoevalcap), :mod:`~lverse.eval.fid` (torch-fidelity, blurred
FID, IS), :mod:`~lverse.eval.similarity` (CLIP score, SBERT, DINO), the protocols
(:mod:`~lverse.eval.protocols`: captions and t2i; :mod:`~lverse.eval.recon`;
:mod:`~lverse.eval.cycle`), and the resumable run directory they share (:mod:`~lverse.eval.run`).
The Shapes protocol lives in :mod:`lverse.shapes.evaluate`. Optional dependencies:
``pip install 'lverse[eval]'``; docs/evaluation.md.
"""
