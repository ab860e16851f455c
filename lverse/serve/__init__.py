"""``lverse serve``: a local web page (and an HTTP API) to try both directions on a bundle.

:mod:`lverse.serve.work` checks requests and runs them through the inference API,
:mod:`lverse.serve.jobs` queues them (one at a time per model, cancellable), and
:mod:`lverse.serve.app` is the FastAPI app: the page (``static/``) and the API (docs/serve.md).
Needs the ``serve`` extra: ``pip install 'lverse[serve]'``.
"""
