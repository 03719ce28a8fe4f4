"""The paper layer: the pipeline that reproduces the SPoT paper's case studies on top of the core.

``config`` (params.yaml and profiles), ``pipeline`` (the papermill runner behind dvc.yaml), ``stage``
(a notebook's setup line), ``study`` (the case studies' analyses), and the stages' models and data:
``datasets``, ``train``, ``backbones``, ``checkpoints``, ``saliency``, ``sparsify``; ``io``, ``stats``,
``tables``, ``plots``. The core (``spotlib``) never imports from here.
"""
